//! Which SDK versions a host loads plugins of.
//!
//! A plugin built with SDK `p` loads in a host with SDK `h` when both are
//! of the same line and, if either is a pre-release, they are the same
//! version:
//!
//! - the line is Cargo's: the same major version; for 0.x, the same minor;
//!   for 0.0.x, the same patch (a caret requirement `^h` and `^p` pick from
//!   the same versions). Older or newer within the line does not matter:
//!   within a line the boundary is frozen ([`super::FORMAT`] and the layout
//!   fingerprint are checked besides), and the plugin carries its own copy
//!   of the SDK, so a plugin of 0.3.9 runs in a host of 0.3.0 with its own
//!   0.3.9 code on its side of the boundary;
//! - a pre-release (`0.3.0-alpha.1`) promises nothing beyond itself: it
//!   loads only with exactly the same version, and a release loads no
//!   pre-release's plugin nor the other way round.
//!
//! The header holds the numbers ([`SdkVersion`]) and the full text; the
//! pre-release tag is read from the text ([`Semver`]).

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
    /// The plugin's SDK is of an older line: rebuild it.
    Older,
    /// The plugin's SDK is of a newer line: rebuild it against the host's
    /// line, or upgrade possync.
    Newer,
    /// The same line, but one of the two is a pre-release and they are not
    /// the same version: rebuild it against the host's very version (or, if
    /// the host's is a release, against a release of its line).
    PreRelease,
    /// The header's version text does not read as a version, or says other
    /// numbers than the header's: rebuild it.
    Unreadable,
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

    /// The line as a value to compare: (major, minor for 0.x, patch for
    /// 0.0.x).
    fn line_key(self) -> (u32, u32, u32) {
        match self {
            Self {
                major: 0, minor: 0, ..
            } => (0, 0, self.patch),
            Self { major: 0, .. } => (0, self.minor, 0),
            Self { major, .. } => (major, 0, 0),
        }
    }

    /// Test-only: this version with patch `patch`, on the same line unless
    /// this is a 0.0.x (0.3.9 for 0.3.0 and 9).
    #[doc(hidden)]
    pub const fn with_patch(self, patch: u32) -> Self {
        Self { patch, ..self }
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

/// An SDK version as its text reads, by semver: the numbers, then any
/// pre-release tag (`-alpha.1`) and build metadata (`+...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Semver {
    /// The numbers.
    pub numbers: SdkVersion,
    /// The pre-release tag without its `-`; empty for a release.
    pub pre: String,
    /// The whole text, as read.
    pub text: String,
}

impl Semver {
    /// This copy of the SDK's.
    pub fn current() -> Self {
        Self::parse(crate::SDK_VERSION).unwrap_or_else(|| Self {
            numbers: SdkVersion::CURRENT,
            pre: String::new(),
            text: crate::SDK_VERSION.to_owned(),
        })
    }

    /// `text` as a version, or `None` if it does not read as one.
    pub fn parse(text: &str) -> Option<Self> {
        let (rest, build) = match text.split_once('+') {
            Some((rest, build)) => (rest, Some(build)),
            None => (text, None),
        };
        let (core, pre) = match rest.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (rest, None),
        };
        let mut numbers = core.split('.').map(|part| {
            (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u32>().ok())
                .flatten()
        });
        let (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) = (
            numbers.next(),
            numbers.next(),
            numbers.next(),
            numbers.next(),
        ) else {
            return None;
        };
        let identifiers = |text: &str| {
            text.split('.').all(|identifier| {
                !identifier.is_empty()
                    && identifier
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        };
        if !pre.is_none_or(identifiers) || !build.is_none_or(identifiers) {
            return None;
        }
        Some(Self {
            numbers: SdkVersion::new(major, minor, patch),
            pre: pre.unwrap_or_default().to_owned(),
            text: text.to_owned(),
        })
    }

    /// The version a header claims with `numbers` and `text`: the text read
    /// by semver, which must say the same numbers.
    pub fn claimed(numbers: SdkVersion, text: &str) -> Result<Self, Mismatch> {
        Self::parse(text)
            .filter(|claimed| claimed.numbers == numbers)
            .ok_or(Mismatch::Unreadable)
    }

    /// Whether this is a pre-release.
    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }

    /// Whether a host with SDK `host` loads a plugin built with `self`.
    pub fn loads_in(&self, host: &Self) -> Result<(), Mismatch> {
        let (plugin_line, host_line) = (self.numbers.line_key(), host.numbers.line_key());
        if plugin_line < host_line {
            return Err(Mismatch::Older);
        }
        if plugin_line > host_line {
            return Err(Mismatch::Newer);
        }
        if (self.is_prerelease() || host.is_prerelease()) && self.text != host.text {
            return Err(Mismatch::PreRelease);
        }
        Ok(())
    }
}

impl std::fmt::Display for Semver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl SdkVersion {
    /// `major.minor.patch`, then `-pre` unless `pre` is empty, as header
    /// text (cut at its length).
    pub(crate) const fn inline(self, pre: &str) -> super::InlineText {
        let mut out = [0u8; 64];
        let mut at = write_number(&mut out, 0, self.major);
        out[at] = b'.';
        at = write_number(&mut out, at + 1, self.minor);
        out[at] = b'.';
        at = write_number(&mut out, at + 1, self.patch);
        if !pre.is_empty() {
            out[at] = b'-';
            at += 1;
            let mut i = 0;
            while i < pre.len() && at < out.len() {
                out[at] = pre.as_bytes()[i];
                at += 1;
                i += 1;
            }
        }
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

    fn v(text: &str) -> Semver {
        Semver::parse(text).unwrap_or_else(|| panic!("{text} reads as a version"))
    }

    fn loads(plugin: &str, host: &str) -> Result<(), Mismatch> {
        v(plugin).loads_in(&v(host))
    }

    #[test]
    fn the_current_version_is_the_packages() {
        assert_eq!(SdkVersion::CURRENT.to_string(), crate::SDK_VERSION);
        assert_eq!(Semver::current().text, crate::SDK_VERSION);
        assert_eq!(Semver::current().numbers, SdkVersion::CURRENT);
    }

    #[test]
    fn a_plugin_of_the_same_line_loads_whether_older_or_newer() {
        assert_eq!(loads("0.3.1", "0.3.1"), Ok(()));
        assert_eq!(loads("0.3.0", "0.3.1"), Ok(()));
        assert_eq!(loads("0.3.9", "0.3.0"), Ok(()), "a newer patch");
        assert_eq!(loads("1.0.0", "1.4.2"), Ok(()));
        assert_eq!(loads("1.2.9", "1.4.2"), Ok(()));
        assert_eq!(loads("1.5.0", "1.4.2"), Ok(()), "a newer minor");
        assert_eq!(loads("1.4.3", "1.4.2"), Ok(()));
    }

    #[test]
    fn below_1_0_another_minor_is_another_line() {
        assert_eq!(loads("0.2.0", "0.3.1"), Err(Mismatch::Older));
        assert_eq!(loads("0.2.9", "0.3.0"), Err(Mismatch::Older));
        assert_eq!(loads("0.4.0", "0.3.1"), Err(Mismatch::Newer));
    }

    #[test]
    fn another_major_is_another_line() {
        assert_eq!(loads("1.0.0", "0.3.1"), Err(Mismatch::Newer));
        assert_eq!(loads("0.9.0", "1.0.0"), Err(Mismatch::Older));
        assert_eq!(loads("1.9.9", "2.0.0"), Err(Mismatch::Older));
        assert_eq!(loads("3.0.0", "2.9.9"), Err(Mismatch::Newer));
    }

    #[test]
    fn below_0_1_every_patch_is_its_own_line() {
        assert_eq!(loads("0.0.3", "0.0.3"), Ok(()));
        assert_eq!(loads("0.0.3", "0.0.4"), Err(Mismatch::Older));
        assert_eq!(loads("0.0.5", "0.0.4"), Err(Mismatch::Newer));
    }

    #[test]
    fn a_pre_release_loads_only_with_exactly_the_same_version() {
        assert_eq!(loads("0.3.0-alpha.1", "0.3.0-alpha.1"), Ok(()));
        assert_eq!(loads("0.3.0-alpha.1", "0.3.0"), Err(Mismatch::PreRelease));
        assert_eq!(loads("0.3.0", "0.3.0-alpha.1"), Err(Mismatch::PreRelease));
        assert_eq!(
            loads("0.3.0-alpha.1", "0.3.0-alpha.2"),
            Err(Mismatch::PreRelease)
        );
        assert_eq!(loads("0.3.1", "0.3.2-rc.1"), Err(Mismatch::PreRelease));
        assert_eq!(loads("1.2.0-beta", "1.4.0"), Err(Mismatch::PreRelease));
        // Another line is said first.
        assert_eq!(loads("0.2.0-alpha.1", "0.3.0"), Err(Mismatch::Older));
    }

    #[test]
    fn versions_read_by_semver_and_anything_else_does_not() {
        let alpha = v("0.3.0-alpha.1+build.7");
        assert_eq!(alpha.numbers, SdkVersion::new(0, 3, 0));
        assert_eq!(alpha.pre, "alpha.1");
        assert!(alpha.is_prerelease());
        assert!(!v("0.3.0+build.7").is_prerelease());
        assert_eq!(
            v("10.0.4294967295").numbers,
            SdkVersion::new(10, 0, u32::MAX)
        );
        for text in [
            "",
            "0.3",
            "0.3.0.1",
            "0.3.x",
            "0.3.-1",
            "0.3.0-",
            "0.3.0-a..b",
            "0.3.0+",
            "0.3.0-é",
            " 0.3.0",
            "0.3.4294967296",
        ] {
            assert_eq!(Semver::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_header_whose_text_is_not_a_version_or_says_other_numbers_is_unreadable() {
        let numbers = SdkVersion::new(0, 3, 0);
        assert_eq!(
            Semver::claimed(numbers, "0.3.0-alpha.1"),
            Ok(v("0.3.0-alpha.1"))
        );
        assert_eq!(Semver::claimed(numbers, "0.3.9"), Err(Mismatch::Unreadable));
        assert_eq!(Semver::claimed(numbers, ""), Err(Mismatch::Unreadable));
    }

    #[test]
    fn header_text_reads_as_the_version() {
        for version in [
            SdkVersion::new(0, 2, 0),
            SdkVersion::new(0, 3, 1),
            SdkVersion::new(10, 0, 4_294_967_295),
        ] {
            assert_eq!(
                super::super::read_inline(&version.inline("")),
                version.to_string()
            );
        }
        assert_eq!(
            super::super::read_inline(&SdkVersion::new(0, 3, 0).inline("alpha.1")),
            "0.3.0-alpha.1"
        );
    }

    #[test]
    fn the_line_reads_as_a_cargo_requirement() {
        assert_eq!(SdkVersion::new(0, 3, 1).line(), "0.3");
        assert_eq!(SdkVersion::new(1, 4, 2).line(), "1");
        assert_eq!(SdkVersion::new(0, 0, 4).line(), "0.0.4");
    }

    #[test]
    fn the_test_versions_fall_on_either_side_of_the_line() {
        for host in ["0.3.1", "0.3.0", "1.4.2", "0.0.4"] {
            let host = v(host);
            let at = |numbers: SdkVersion| v(&numbers.to_string());
            assert_eq!(
                at(host.numbers.with_patch(host.numbers.patch + 9)).loads_in(&host),
                if host.numbers.major == 0 && host.numbers.minor == 0 {
                    Err(Mismatch::Newer)
                } else {
                    Ok(())
                },
                "{host}"
            );
            assert_eq!(
                at(host.numbers.next_breaking()).loads_in(&host),
                Err(Mismatch::Newer),
                "{host}"
            );
        }
    }
}
