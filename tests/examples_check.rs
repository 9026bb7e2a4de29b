//! The shipped example configurations load with `--check`.

use std::process::Command;

#[test]
fn example_configs_pass_check() {
    for (part, file) in [
        ("server", "examples/local/server.toml"),
        ("agent", "examples/local/agent.toml"),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = Command::new(env!("CARGO_BIN_EXE_meshid"))
            .args([part, "run", "--check", "--config"])
            .arg(&path)
            .output()
            .expect("run meshid");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("config OK"));
    }
}
