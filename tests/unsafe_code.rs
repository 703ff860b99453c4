//! Unsafe code lives in one module, the dynamic-plugin boundary
//! (`sdk/src/ffi/`), and every unsafe block there says why it is sound.

use std::path::{Path, PathBuf};

const BOUNDARY: &str = "sdk/src/ffi";

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["core", "sdk", "plugins"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found the sources: {files:?}");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read source");
            let relative = path
                .strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            (relative, text)
        })
        .collect()
}

/// Whether `line` uses `unsafe` as a keyword (not in a comment).
fn uses_unsafe(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or_default();
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|word| word == "unsafe")
}

#[test]
fn unsafe_code_is_only_in_the_plugin_boundary() {
    let outside: Vec<String> = sources()
        .iter()
        .filter(|(path, _)| !path.starts_with(BOUNDARY))
        .flat_map(|(path, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| uses_unsafe(line))
                .map(move |(number, line)| format!("{path}:{}: {}", number + 1, line.trim()))
        })
        .collect();
    assert!(
        outside.is_empty(),
        "unsafe outside {BOUNDARY}:\n{}",
        outside.join("\n")
    );
}

#[test]
fn every_unsafe_block_in_the_boundary_says_why_it_is_sound() {
    let mut unexplained = Vec::new();
    let mut blocks = 0;
    for (path, text) in sources().iter().filter(|(p, _)| p.starts_with(BOUNDARY)) {
        let lines: Vec<&str> = text.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            // Blocks and impls need a reason; `unsafe extern "C"` declarations
            // of function pointer types and attributes do not.
            let code = line.split("//").next().unwrap_or_default();
            if !(code.contains("unsafe {") || code.contains("unsafe impl")) {
                continue;
            }
            blocks += 1;
            let explained = lines[index.saturating_sub(12)..=index]
                .iter()
                .any(|l| l.trim_start().starts_with("// SAFETY:"));
            if !explained {
                unexplained.push(format!("{path}:{}: {}", index + 1, line.trim()));
            }
        }
    }
    assert!(blocks > 0, "the boundary has unsafe blocks to check");
    assert!(
        unexplained.is_empty(),
        "unsafe without a // SAFETY: comment just above:\n{}",
        unexplained.join("\n")
    );
}
