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
//! `POSSYNC_PLAIN_LINK=1` links without it (another linker). Symbols are
//! stripped on ELF targets only.

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
    let elf = matches!(
        std::env::var("CARGO_CFG_TARGET_OS").as_deref(),
        Ok("linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly" | "illumos")
    );
    if elf && !set("POSSYNC_LINK_SYMBOLS") {
        println!("cargo:rustc-link-arg-bins=-Wl,--strip-all");
    }
    let lld_target = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    if !lld_target || set("POSSYNC_PLAIN_LINK") {
        return;
    }
    if let Ok(order) = std::fs::canonicalize(order) {
        warn_if_stale(&order);
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

/// The list names functions as one Rust version mangles them; with
/// another, most names match nothing and the build says so.
fn warn_if_stale(order: &Path) {
    let listed = std::fs::read_to_string(order).unwrap_or_default();
    let made_with = listed
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("# "))
        .unwrap_or_default()
        .to_owned();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let running = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    if made_with != running {
        println!(
            "cargo:warning=link/possync-terminal.order was written with {made_with:?}, this is {running:?}: run link/order-possync-terminal again for a till that keeps less resident"
        );
    }
}
