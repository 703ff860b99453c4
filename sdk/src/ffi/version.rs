//! Which SDK versions a host loads plugins of: the rule of Cargo's caret
//! requirements, seen from the host. A plugin built with SDK `p` loads in a
//! host with SDK `h` when `h` could have been picked for the requirement
//! `^p`: the same major version (for 0.x, the same minor; for 0.0.x, the
//! same patch), and `p` no newer than `h`.

/// An SDK version as it crosses: numbers only.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SdkVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

/// Why a plugin's SDK version does not fit the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The plugin's SDK is of an older, incompatible line: rebuild it.
    Older,
    /// The plugin's SDK is newer than the host's: rebuild it against the
    /// host's line (no newer than the host), or upgrade possync.
    Newer,
}

impl SdkVersion {
    /// This copy of the SDK.
    pub const CURRENT: Self = Self {
        major: parse(env!("CARGO_PKG_VERSION_MAJOR")),
        minor: parse(env!("CARGO_PKG_VERSION_MINOR")),
        patch: parse(env!("CARGO_PKG_VERSION_PATCH")),
    };

    /// A version.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Whether a host with SDK `host` loads a plugin built with `self`.
    pub fn loads_in(self, host: Self) -> Result<(), Mismatch> {
        if self.line() != host.line() {
            return Err(if self < host {
                Mismatch::Older
            } else {
                Mismatch::Newer
            });
        }
        if self > host {
            return Err(Mismatch::Newer);
        }
        Ok(())
    }

    /// The line of compatible versions this one belongs to, as a Cargo
    /// requirement: `0.3` for 0.3.x, `1` for 1.x.y, `0.0.4` for 0.0.4.
    pub fn line(self) -> String {
        match self {
            Self {
                major: 0,
                minor: 0,
                patch,
            } => format!("0.0.{patch}"),
            Self {
                major: 0, minor, ..
            } => format!("0.{minor}"),
            Self { major, .. } => major.to_string(),
        }
    }

    /// Test-only: the oldest version of this one's line (0.3.0 for 0.3.4),
    /// which a host of this version must load.
    #[doc(hidden)]
    pub const fn oldest_compatible(self) -> Self {
        match self {
            Self {
                major: 0, minor: 0, ..
            } => self,
            Self {
                major: 0, minor, ..
            } => Self::new(0, minor, 0),
            Self { major, .. } => Self::new(major, 0, 0),
        }
    }

    /// Test-only: the first version of the next line (0.4.0 for 0.3.4, 2.0.0
    /// for 1.2.3), which a host of this version must refuse.
    #[doc(hidden)]
    pub const fn next_breaking(self) -> Self {
        match self {
            Self {
                major: 0,
                minor: 0,
                patch,
            } => Self::new(0, 0, patch + 1),
            Self {
                major: 0, minor, ..
            } => Self::new(0, minor + 1, 0),
            Self { major, .. } => Self::new(major + 1, 0, 0),
        }
    }
}

impl SdkVersion {
    /// `major.minor.patch` as header text.
    pub(crate) const fn inline(self) -> super::InlineText {
        let mut out = [0u8; 64];
        let mut at = write_number(&mut out, 0, self.major);
        out[at] = b'.';
        at = write_number(&mut out, at + 1, self.minor);
        out[at] = b'.';
        write_number(&mut out, at + 1, self.patch);
        out
    }
}

/// Writes `value` in decimal at `out[at..]`; returns where it ends.
const fn write_number(out: &mut super::InlineText, at: usize, value: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut count = 0;
    let mut rest = value;
    loop {
        digits[count] = b'0' + (rest % 10) as u8;
        count += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut i = 0;
    while i < count {
        out[at + i] = digits[count - 1 - i];
        i += 1;
    }
    at + count
}

impl std::fmt::Display for SdkVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A decimal number at compile time (Cargo's version parts are digits).
const fn parse(digits: &str) -> u32 {
    let bytes = digits.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "a version part is a number");
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> SdkVersion {
        SdkVersion::new(major, minor, patch)
    }

    #[test]
    fn the_current_version_is_the_packages() {
        assert_eq!(SdkVersion::CURRENT.to_string(), crate::SDK_VERSION);
    }

    #[test]
    fn a_plugin_of_the_same_version_or_an_older_patch_loads() {
        assert_eq!(v(0, 3, 1).loads_in(v(0, 3, 1)), Ok(()));
        assert_eq!(v(0, 3, 0).loads_in(v(0, 3, 1)), Ok(()));
        assert_eq!(v(1, 0, 0).loads_in(v(1, 4, 2)), Ok(()));
        assert_eq!(v(1, 2, 9).loads_in(v(1, 4, 2)), Ok(()));
    }

    #[test]
    fn below_1_0_another_minor_is_another_line() {
        assert_eq!(v(0, 2, 0).loads_in(v(0, 3, 1)), Err(Mismatch::Older));
        assert_eq!(v(0, 2, 9).loads_in(v(0, 3, 0)), Err(Mismatch::Older));
        assert_eq!(v(0, 4, 0).loads_in(v(0, 3, 1)), Err(Mismatch::Newer));
    }

    #[test]
    fn another_major_is_another_line() {
        assert_eq!(v(1, 0, 0).loads_in(v(0, 3, 1)), Err(Mismatch::Newer));
        assert_eq!(v(0, 9, 0).loads_in(v(1, 0, 0)), Err(Mismatch::Older));
        assert_eq!(v(1, 9, 9).loads_in(v(2, 0, 0)), Err(Mismatch::Older));
    }

    #[test]
    fn a_plugin_newer_than_the_host_is_refused_even_on_the_same_line() {
        assert_eq!(v(0, 3, 2).loads_in(v(0, 3, 1)), Err(Mismatch::Newer));
        assert_eq!(v(1, 5, 0).loads_in(v(1, 4, 2)), Err(Mismatch::Newer));
    }

    #[test]
    fn below_0_1_every_patch_is_its_own_line() {
        assert_eq!(v(0, 0, 3).loads_in(v(0, 0, 3)), Ok(()));
        assert_eq!(v(0, 0, 3).loads_in(v(0, 0, 4)), Err(Mismatch::Older));
    }

    #[test]
    fn header_text_reads_as_the_version() {
        for version in [v(0, 2, 0), v(0, 3, 1), v(10, 0, 4_294_967_295)] {
            assert_eq!(
                super::super::read_inline(&version.inline()),
                version.to_string()
            );
        }
    }

    #[test]
    fn the_line_reads_as_a_cargo_requirement() {
        assert_eq!(v(0, 3, 1).line(), "0.3");
        assert_eq!(v(1, 4, 2).line(), "1");
        assert_eq!(v(0, 0, 4).line(), "0.0.4");
    }

    #[test]
    fn the_test_versions_fall_on_either_side_of_the_line() {
        for host in [v(0, 3, 1), v(0, 3, 0), v(1, 4, 2), v(0, 0, 4)] {
            assert_eq!(host.oldest_compatible().loads_in(host), Ok(()), "{host}");
            assert_eq!(
                host.next_breaking().loads_in(host),
                Err(Mismatch::Newer),
                "{host}"
            );
        }
    }
}
