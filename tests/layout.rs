//! The source tree's shape: the module graph of src/ (from each file's `crate::` and `super::` paths)
//! has no import cycle, so every module sits on a floor above the ones it uses (issue 21).

use std::path::Path;
use std::process::Command;

/// Runs scripts/module_cycles.py on `src`: (exit code, stdout).
fn module_cycles(src: &Path) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/module_cycles.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(src)
        .output()
        .expect("python3 runs scripts/module_cycles.py (install Python 3 to run this test)");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn module_graph_has_no_cycle() {
    let (code, stdout) = module_cycles(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert_eq!(code, 0, "src/ has an import cycle:\n{stdout}");
    assert!(stdout.contains("no cycle"), "{stdout}");
}

/// The check itself can fail: a two-module cycle through a `use` group, a test module's `super::*`
/// (its own file: no edge) and a path in a comment (no edge) are told apart.
#[test]
fn module_cycle_check_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir(src.join("b")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::{c, b::inner::{X, Y}};\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub mod inner;\n").unwrap();
    std::fs::write(src.join("b/inner.rs"), "use super::super::a::Z;\n#[cfg(test)]\nmod tests { use super::*; }\n")
        .unwrap();
    std::fs::write(src.join("c.rs"), "// crate::a::Z would be a cycle, but this is a comment\n").unwrap();
    let (code, stdout) = module_cycles(src);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("cycle among 2 modules: a, b::inner"), "{stdout}");
}
