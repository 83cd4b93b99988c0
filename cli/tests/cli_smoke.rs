//! Smoke tests of the `pacha` binary's argument handling (its presence here also makes
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure
//! `cargo test --workspace` build the binary that `tests/tests/cli_e2e.rs` runs).

use std::process::Command;

fn pacha() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pacha"))
}

#[test]
fn help_lists_every_command() {
    let out = pacha().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "generate",
        "ingest",
        "index",
        "calibrate",
        "dedup",
        "identify",
        "verify",
        "delete",
        "eval",
        "report",
        "info",
        "check",
        "demo",
    ] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let out = pacha().arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = pacha().args(["dedup", "--store"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
