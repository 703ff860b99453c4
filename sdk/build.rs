//! Records the compiler and target this SDK copy is built with, for the ABI
//! header of dynamic plugins: a plugin and its host must agree on both.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|| "unknown rustc".into());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown target".into());
    println!("cargo:rustc-env=POSSYNC_SDK_RUSTC={version}");
    println!("cargo:rustc-env=POSSYNC_SDK_TARGET={target}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
