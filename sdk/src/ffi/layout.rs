//! The layout fingerprint: one number, computed at compile time, over the
//! size and alignment of every type that crosses the boundary, the offset
//! and size of each of their fields, and the text of every function type.
//! A plugin and a host that agree on it agree on every layout, including a
//! change that keeps a type's size (two fields swapped).

use std::mem::{align_of, offset_of, size_of};

use super::{
    Bytes, Declaration, Effect, Header, HostServices, MessageContext, Order, RowSink, SIGNATURES,
    SdkVersion, Sink, StoreApi, Value,
};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `hash` with the eight bytes of `value` folded in (FNV-1a).
const fn mix(mut hash: u64, value: u64) -> u64 {
    let bytes = value.to_le_bytes();
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    hash
}

/// `hash` with the bytes of `text` folded in, white space left out.
const fn mix_text(mut hash: u64, text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_whitespace() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(FNV_PRIME);
        }
        i += 1;
    }
    hash
}

/// The size of the field `field` selects.
const fn field_size<T, F>(_field: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Folds the layout of `$ty` into `$hash`: its size and alignment, how many
/// fields are listed, then each field's offset and size, in the order
/// listed (which is by name, not by position: a field that moves changes
/// its offset).
macro_rules! layout_of {
    ($hash:expr, $ty:ty { $($field:ident),* $(,)? }) => {{
        let mut hash = mix($hash, size_of::<$ty>() as u64);
        hash = mix(hash, align_of::<$ty>() as u64);
        hash = mix(hash, [$(stringify!($field)),*].len() as u64);
        $(
            hash = mix(hash, offset_of!($ty, $field) as u64);
            hash = mix(hash, field_size::<$ty, _>(|value| &value.$field) as u64);
        )*
        hash
    }};
}

/// The fingerprint of this SDK's boundary types, as compiled.
pub const FINGERPRINT: u64 = {
    let hash = FNV_OFFSET;
    let hash = layout_of!(hash, Bytes { ptr, len });
    let hash = layout_of!(hash, Sink { ctx, write });
    let hash = layout_of!(
        hash,
        Value {
            kind,
            integer,
            real,
            bytes
        }
    );
    let hash = layout_of!(
        hash,
        Order {
            micros,
            present,
            exact
        }
    );
    let hash = layout_of!(
        hash,
        MessageContext {
            message_type,
            license_key,
            message_id,
            timestamp,
            order
        }
    );
    let hash = layout_of!(hash, RowSink { ctx, row });
    let hash = layout_of!(hash, Effect { data, run, drop });
    let hash = layout_of!(
        hash,
        StoreApi {
            ctx,
            execute,
            query_row,
            after_commit,
            on_rollback,
            stale
        }
    );
    let hash = layout_of!(hash, HostServices { log });
    let hash = layout_of!(
        hash,
        SdkVersion {
            major,
            minor,
            patch
        }
    );
    let hash = layout_of!(
        hash,
        Header {
            magic,
            format,
            unwinds,
            layout,
            sdk,
            sdk_text,
            target
        }
    );
    let hash = layout_of!(
        hash,
        Declaration {
            header,
            plugin_version,
            create,
            describe,
            check,
            handle,
            destroy
        }
    );
    let hash = mix(hash, size_of::<super::Status>() as u64);
    let hash = mix(hash, align_of::<super::Status>() as u64);
    mix_text(hash, SIGNATURES)
};

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    struct Before {
        kind: u32,
        integer: i64,
        real: f64,
    }

    /// The same fields, two of the same size swapped: the same size and
    /// alignment, another layout.
    #[repr(C)]
    struct After {
        kind: u32,
        real: f64,
        integer: i64,
    }

    #[test]
    fn reordering_two_fields_of_the_same_size_changes_the_fingerprint() {
        assert_eq!(size_of::<Before>(), size_of::<After>());
        assert_eq!(align_of::<Before>(), align_of::<After>());
        let before = layout_of!(
            FNV_OFFSET,
            Before {
                kind,
                integer,
                real
            }
        );
        let after = layout_of!(
            FNV_OFFSET,
            After {
                kind,
                integer,
                real
            }
        );
        assert_ne!(before, after);
    }

    #[test]
    fn the_same_layout_has_the_same_fingerprint() {
        let once = layout_of!(
            FNV_OFFSET,
            Before {
                kind,
                integer,
                real
            }
        );
        let again = layout_of!(
            FNV_OFFSET,
            Before {
                kind,
                integer,
                real
            }
        );
        assert_eq!(once, again);
    }

    #[test]
    fn a_changed_signature_changes_the_fingerprint_but_white_space_does_not() {
        let signature = "Fn = unsafe extern \"C\" fn(ctx: *mut c_void) -> Status;";
        assert_eq!(
            mix_text(FNV_OFFSET, signature),
            mix_text(
                FNV_OFFSET,
                "Fn = unsafe extern \"C\" fn(\n    ctx: *mut c_void\n) -> Status;"
            )
        );
        assert_ne!(
            mix_text(FNV_OFFSET, signature),
            mix_text(
                FNV_OFFSET,
                "Fn = unsafe extern \"C\" fn(ctx: *mut c_void, n: usize) -> Status;"
            )
        );
    }
}
