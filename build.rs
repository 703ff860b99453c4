//! How `possync-terminal`, the program a till runs, is linked in the
//! size-optimised profile (`release-stripped`, `opt-level = "z"`): the
//! functions it runs from start to idle placed first, together
//! (`link/possync-terminal.order`, written by `link/order-possync-terminal`),
//! so that a till keeps far less of it resident (BENCHMARKS.md, a light
//! terminal), and symbols stripped at the link, not by the profile, so that
//! the script's build with symbols (`POSSYNC_LINK_SYMBOLS=1`) names the
//! very functions the till build has.
//!
//! The order needs LLD, the linker Rust uses on x86_64 Linux since 1.90;
//! `POSSYNC_PLAIN_LINK=1` links without it (another linker, an older Rust).

use std::path::Path;

fn main() {
    let order = Path::new("link/possync-terminal.order");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", order.display());
    for var in ["POSSYNC_LINK_SYMBOLS", "POSSYNC_PLAIN_LINK"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let set = |var: &str| std::env::var_os(var).is_some_and(|value| value == "1");
    if std::env::var("OPT_LEVEL").as_deref() != Ok("z") {
        return;
    }
    if !set("POSSYNC_LINK_SYMBOLS") {
        println!("cargo:rustc-link-arg-bins=-Wl,--strip-all");
    }
    let lld_target = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    if !lld_target || set("POSSYNC_PLAIN_LINK") {
        return;
    }
    if let Ok(order) = std::fs::canonicalize(order) {
        // A function the list names but the program lacks (renamed since)
        // is skipped: the list only ever places code, never changes it.
        for arg in [
            format!("-Wl,--symbol-ordering-file={}", order.display()),
            "-Wl,--no-warn-symbol-ordering".to_owned(),
        ] {
            println!("cargo:rustc-link-arg-bin=possync-terminal={arg}");
        }
    }
}
