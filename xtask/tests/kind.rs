//! `xtask kind` without docker, kind and kubectl fails with one clear
//! sentence (the binary itself, as a user runs it).

use std::process::Command;

#[test]
fn kind_without_the_tools_fails_with_a_clear_message() {
    let empty = std::env::temp_dir().join(format!("xtask-kind-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("kind")
        .env("PATH", &empty)
        .output()
        .expect("running xtask");
    let _ = std::fs::remove_dir(&empty);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "`cargo xtask kind` needs docker, kind and kubectl on PATH, and these are not found: install docker, kind, kubectl and retry."
        ),
        "{stderr}"
    );
}
