//! Link options for `possync-terminal`, the program a till runs, so that
//! less of it is read at start and kept resident (BENCHMARKS.md, a light
//! terminal): relative relocations packed (RELR), identical functions
//! folded where no address is compared (`--icf=safe`), and the functions
//! it runs until idle placed first, together (`link/possync-terminal.order`,
//! written by `link/order-possync-terminal`). They need LLD, the linker Rust
//! uses on x86_64 Linux; elsewhere the program links as usual.

use std::path::Path;

fn main() {
    let order = Path::new("link/possync-terminal.order");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", order.display());
    if std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return;
    }
    let mut args = vec![
        "-Wl,-z,pack-relative-relocs".to_owned(),
        "-Wl,--icf=safe".to_owned(),
    ];
    if let Ok(order) = std::fs::canonicalize(order) {
        // A function the list names but the program lacks (renamed since)
        // is skipped: the list only ever places code, never changes it.
        args.push(format!("-Wl,--symbol-ordering-file={}", order.display()));
        args.push("-Wl,--no-warn-symbol-ordering".to_owned());
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bin=possync-terminal={arg}");
    }
}
