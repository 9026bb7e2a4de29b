//! The README's first command: `meshid demo` runs to its summary and exits 0.

#[test]
fn demo_runs_to_its_summary() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .args(["--log", "warn", "demo", "--ttl", "6s"])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "payments served caller spiffe://demo.local/frontend",
        "rotated: payments now presents serial",
        "refused at the mTLS handshake",
        "refusing to start",
        "== Summary",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
