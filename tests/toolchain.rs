//! `make`'s toolchain check, run as an operator runs it: with a `rustc` on PATH that prints an
//! old, the declared or a newer version, before anything is built.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// `make -s toolchain` from the repository's root, with a fake `rustc` printing `version_line`
/// first on PATH.
fn check_with_rustc(version_line: &str) -> Output {
    let bin = tempfile::tempdir().unwrap();
    let rustc = bin.path().join("rustc");
    std::fs::write(&rustc, format!("#!/bin/sh\necho '{version_line}'\n")).unwrap();
    std::fs::set_permissions(&rustc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    Command::new("make")
        .args(["-s", "toolchain"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PATH", path)
        .output()
        .expect("make runs")
}

/// The `rust-version` that Cargo.toml declares.
fn declared() -> String {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let line = manifest.lines().find(|line| line.starts_with("rust-version = ")).expect("rust-version is declared");
    line.trim_start_matches("rust-version = ").trim_matches('"').to_owned()
}

#[test]
fn an_older_rustc_is_named_with_the_version_needed_and_fails() {
    let output = check_with_rustc("rustc 1.80.1 (3f5fd8dd4 2024-08-06)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let expected = format!("error: Rust 1.80.1 is too old: CountApp needs Rust {} or newer", declared());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("rustup update"), "{stderr}");
}

#[test]
fn the_declared_version_and_newer_ones_pass() {
    let need = declared();
    for line in [
        format!("rustc {need}.0 (29483883e 2025-08-04)"),
        "rustc 1.200.0-nightly (59807616e 2040-04-14)".to_owned(),
        "rustc 2.0.0".to_owned(),
    ] {
        let output = check_with_rustc(&line);
        assert!(output.status.success(), "{line}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(output.stderr.is_empty(), "{line}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn a_rustc_that_names_no_version_is_reported() {
    let output = check_with_rustc("something else entirely");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot tell the version of rustc"), "{stderr}");
}
