//! The layout fingerprint: one number, computed at compile time, over
//! every type that crosses the boundary and every number whose meaning both
//! sides must share:
//!
//! - each `#[repr(C)]` type's name, size, alignment and number of fields,
//!   then each field's name, type (as written), offset and size. Every
//!   field is listed: a never-called function destructures the type with
//!   exactly the fields listed, so a field left out (one added in padding,
//!   say) does not compile; each field is read as the type listed, so a
//!   listed type that is not the field's does not compile either;
//! - the size and alignment of [`Status`];
//! - every status code and value kind by name and number (`Status::CODES`,
//!   `Value::KINDS`, each declared with the list that holds it);
//! - every log level by name and the number it crosses as (an exhaustive
//!   `match` in a never-called function, so a level left out does not
//!   compile);
//! - the text of every function type (white space left out).
//!
//! A plugin and a host that agree on it agree on every layout, including a
//! change that keeps a type's size (two fields swapped, a field added in
//! padding, an `i64` become a `u64`), and on what each number means.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::mem::{align_of, offset_of, size_of};

use super::{
    Bytes, CheckFn, CreateFn, Declaration, DescribeFn, DestroyFn, Effect, EffectFn, ExecuteFn,
    HandleFn, Header, HostServices, InlineText, LogFn, MessageContext, Order, QueryRowFn, RowFn,
    RowSink, SIGNATURES, SdkVersion, Sink, StaleFn, Status, StoreApi, TakeEffectFn, Value, WriteFn,
};
use crate::log::Level;

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

/// `hash` with a name folded in, then a separator no name holds, so that
/// names in a row cannot run into each other.
const fn mix_name(hash: u64, name: &str) -> u64 {
    mix(mix_text(hash, name), u64::MAX)
}

/// `hash` with a named number folded in.
const fn mix_code(hash: u64, name: &str, number: u32) -> u64 {
    mix(mix_name(hash, name), number as u64)
}

/// The size of the field `field` selects, which must be an `F`.
const fn field_size<T, F>(_field: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Folds the layout of `$ty` into `$hash`: its name, size and alignment,
/// how many fields it has, then each field's name, type, offset and size,
/// in the order listed (by name, not by position: a field that moves
/// changes its offset). Every field must be listed, with its type, or this
/// does not compile.
macro_rules! layout_of {
    ($hash:expr, $ty:ident { $($field:ident: $field_ty:ty),* $(,)? }) => {{
        // Never called: a field missing from the list is an error here.
        #[allow(dead_code)]
        fn _every_field_is_listed(value: &$ty) {
            let $ty { $($field: _),* } = value;
        }
        let mut hash = mix_name($hash, stringify!($ty));
        hash = mix(hash, size_of::<$ty>() as u64);
        hash = mix(hash, align_of::<$ty>() as u64);
        hash = mix(hash, [$(stringify!($field)),*].len() as u64);
        $(
            hash = mix_name(hash, stringify!($field));
            hash = mix_name(hash, stringify!($field_ty));
            hash = mix(hash, offset_of!($ty, $field) as u64);
            // Does not compile unless the field is a `$field_ty`.
            hash = mix(hash, field_size::<$ty, $field_ty>(|value| &value.$field) as u64);
        )*
        hash
    }};
}

/// Folds the variants of the fieldless enum `$ty` into `$hash`: its name,
/// how many variants it has, then each one's name and the number it
/// crosses as (`as u32`). Every variant must be listed, or this does not
/// compile.
macro_rules! variants_of {
    ($hash:expr, $ty:ident { $($variant:ident),* $(,)? }) => {{
        // Never called: a variant missing from the list is an error here.
        #[allow(dead_code)]
        fn _every_variant_is_listed(value: $ty) {
            match value {
                $($ty::$variant)|* => {}
            }
        }
        let mut hash = mix_name($hash, stringify!($ty));
        hash = mix(hash, [$(stringify!($variant)),*].len() as u64);
        $(hash = mix_code(hash, stringify!($variant), $ty::$variant as u32);)*
        hash
    }};
}

/// Folds a list of named codes (see `codes!`) into `$hash`: how many, then
/// each one's name and number, `$number` of the code bound to `$code`.
macro_rules! codes_of {
    ($hash:expr, $codes:expr, |$code:ident| $number:expr) => {{
        let codes = $codes;
        let mut hash = mix($hash, codes.len() as u64);
        let mut i = 0;
        while i < codes.len() {
            let (name, $code) = codes[i];
            hash = mix_code(hash, name, $number);
            i += 1;
        }
        hash
    }};
}

/// The fingerprint of this SDK's boundary, as compiled.
pub const FINGERPRINT: u64 = {
    let hash = FNV_OFFSET;
    let hash = layout_of!(hash, Bytes { ptr: *const u8, len: usize });
    let hash = layout_of!(
        hash,
        Sink {
            ctx: *mut c_void,
            write: WriteFn,
            buffer: PhantomData<&mut Vec<u8>>,
        }
    );
    let hash = layout_of!(
        hash,
        Value {
            kind: u32,
            integer: i64,
            real: f64,
            bytes: Bytes,
        }
    );
    let hash = layout_of!(
        hash,
        Order {
            micros: i64,
            present: u32,
            exact: u32,
        }
    );
    let hash = layout_of!(
        hash,
        MessageContext {
            message_type: Bytes,
            license_key: Bytes,
            message_id: Bytes,
            timestamp: Bytes,
            order: Order,
        }
    );
    let hash = layout_of!(hash, RowSink { ctx: *mut c_void, row: RowFn });
    let hash = layout_of!(
        hash,
        Effect {
            data: *mut c_void,
            run: EffectFn,
            drop: EffectFn,
        }
    );
    let hash = layout_of!(
        hash,
        StoreApi {
            ctx: *mut c_void,
            execute: ExecuteFn,
            query_row: QueryRowFn,
            after_commit: TakeEffectFn,
            on_rollback: TakeEffectFn,
            stale: StaleFn,
        }
    );
    let hash = layout_of!(hash, HostServices { log: LogFn });
    let hash = layout_of!(
        hash,
        SdkVersion {
            major: u32,
            minor: u32,
            patch: u32,
        }
    );
    let hash = layout_of!(
        hash,
        Header {
            magic: [u8; 8],
            format: u32,
            unwinds: u32,
            layout: u64,
            sdk: SdkVersion,
            sdk_text: InlineText,
            target: InlineText,
        }
    );
    let hash = layout_of!(
        hash,
        Declaration {
            header: Header,
            plugin_version: InlineText,
            create: CreateFn,
            describe: DescribeFn,
            check: CheckFn,
            handle: HandleFn,
            destroy: DestroyFn,
        }
    );
    let hash = mix(hash, size_of::<Status>() as u64);
    let hash = mix(hash, align_of::<Status>() as u64);
    let hash = codes_of!(hash, Status::CODES, |status| status.0);
    let hash = codes_of!(hash, Value::KINDS, |kind| kind);
    let hash = variants_of!(
        hash,
        Level {
            Debug,
            Info,
            Warn,
            Error
        }
    );
    mix_text(hash, SIGNATURES)
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint of a type named `Value` in each of these modules:
    /// its name is part of the fingerprint, so the variants compared share it.
    mod before {
        #[repr(C)]
        pub(super) struct Value {
            pub(super) kind: u32,
            pub(super) integer: i64,
            pub(super) real: f64,
        }
    }

    /// Two fields of the same size swapped: the same size and alignment,
    /// another layout.
    mod swapped {
        #[repr(C)]
        pub(super) struct Value {
            pub(super) kind: u32,
            pub(super) real: f64,
            pub(super) integer: i64,
        }
    }

    /// A field added in the padding after `kind`: the same size, and every
    /// field of `before` at the same offset.
    mod padded {
        #[repr(C)]
        pub(super) struct Value {
            pub(super) kind: u32,
            pub(super) flags: u32,
            pub(super) integer: i64,
            pub(super) real: f64,
        }
    }

    /// A field become another type of the same size.
    mod unsigned {
        #[repr(C)]
        pub(super) struct Value {
            pub(super) kind: u32,
            pub(super) integer: u64,
            pub(super) real: f64,
        }
    }

    fn before() -> u64 {
        use before::Value;
        layout_of!(
            FNV_OFFSET,
            Value {
                kind: u32,
                integer: i64,
                real: f64,
            }
        )
    }

    #[test]
    fn the_same_layout_has_the_same_fingerprint() {
        assert_eq!(before(), before());
    }

    #[test]
    fn reordering_two_fields_of_the_same_size_changes_the_fingerprint() {
        use swapped::Value;
        assert_eq!(size_of::<before::Value>(), size_of::<Value>());
        assert_eq!(align_of::<before::Value>(), align_of::<Value>());
        let after = layout_of!(
            FNV_OFFSET,
            Value {
                kind: u32,
                integer: i64,
                real: f64,
            }
        );
        assert_ne!(before(), after);
    }

    #[test]
    fn a_field_added_in_padding_changes_the_fingerprint() {
        use padded::Value;
        assert_eq!(size_of::<before::Value>(), size_of::<Value>());
        assert_eq!(align_of::<before::Value>(), align_of::<Value>());
        assert_eq!(
            [
                offset_of!(before::Value, integer),
                offset_of!(before::Value, real)
            ],
            [offset_of!(Value, integer), offset_of!(Value, real)],
            "every field that was there stays where it was"
        );
        // Leaving `flags` out of this list does not compile (the
        // destructuring in `layout_of!` misses a field).
        let after = layout_of!(
            FNV_OFFSET,
            Value {
                kind: u32,
                flags: u32,
                integer: i64,
                real: f64,
            }
        );
        assert_ne!(before(), after);
    }

    #[test]
    fn a_field_whose_type_changes_to_another_of_the_same_size_changes_the_fingerprint() {
        use unsigned::Value;
        assert_eq!(size_of::<before::Value>(), size_of::<Value>());
        // Listing `integer` as an `i64` here does not compile.
        let after = layout_of!(
            FNV_OFFSET,
            Value {
                kind: u32,
                integer: u64,
                real: f64,
            }
        );
        assert_ne!(before(), after);
    }

    #[test]
    fn a_code_renumbered_added_or_removed_changes_the_fingerprint() {
        const CODES: &[(&str, u32)] = &[("OK", 0), ("STORAGE", 4)];
        let of = |codes: &[(&str, u32)]| codes_of!(FNV_OFFSET, codes, |code| code);
        assert_eq!(of(CODES), of(&[("OK", 0), ("STORAGE", 4)]));
        assert_ne!(of(CODES), of(&[("OK", 0), ("STORAGE", 5)]), "renumbered");
        assert_ne!(of(CODES), of(&[("OK", 0), ("SHORT", 4)]), "renamed");
        assert_ne!(
            of(CODES),
            of(&[("OK", 0), ("STORAGE", 4), ("BUSY", 5)]),
            "added"
        );
        assert_ne!(of(CODES), of(&[("OK", 0)]), "removed");
    }

    #[test]
    fn the_boundarys_codes_are_all_listed_for_the_fingerprint() {
        let statuses: Vec<u32> = Status::CODES.iter().map(|(_, status)| status.0).collect();
        assert_eq!(statuses, [0, 1, 2, 3, 4]);
        assert_eq!(Status::CODES[4], ("STORAGE", Status::STORAGE));
        let kinds: Vec<u32> = Value::KINDS.iter().map(|(_, kind)| *kind).collect();
        assert_eq!(kinds, [0, 1, 2, 3, 4]);
        assert_eq!(Value::KINDS[3], ("TEXT", Value::TEXT));
    }

    mod levels {
        #[derive(Clone, Copy)]
        pub(super) enum Level {
            Debug,
            Info,
            Warn,
            Error,
        }
    }

    /// The same levels, numbered otherwise.
    mod renumbered {
        #[derive(Clone, Copy)]
        pub(super) enum Level {
            Debug = 1,
            Info = 0,
            Warn = 2,
            Error = 3,
        }
    }

    /// One level more.
    mod more {
        #[derive(Clone, Copy)]
        pub(super) enum Level {
            Trace,
            Debug,
            Info,
            Warn,
            Error,
        }
    }

    #[test]
    fn a_log_level_renumbered_or_added_changes_the_fingerprint() {
        let levels = {
            use levels::Level;
            variants_of!(
                FNV_OFFSET,
                Level {
                    Debug,
                    Info,
                    Warn,
                    Error
                }
            )
        };
        let renumbered = {
            use renumbered::Level;
            variants_of!(
                FNV_OFFSET,
                Level {
                    Debug,
                    Info,
                    Warn,
                    Error
                }
            )
        };
        // Leaving `Trace` out of this list does not compile (the `match`
        // in `variants_of!` is not exhaustive).
        let more = {
            use more::Level;
            variants_of!(
                FNV_OFFSET,
                Level {
                    Trace,
                    Debug,
                    Info,
                    Warn,
                    Error
                }
            )
        };
        assert_ne!(levels, renumbered);
        assert_ne!(levels, more);
        assert_eq!(crate::log::Level::Error as u32, 3);
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
