//! `docs/cli.md` is the CLI reference generated from the clap definitions;
//! this test fails when the two drift apart. Regenerate with
//! `MESHID_BLESS=1 cargo test --test cli_reference`.

use std::path::Path;

#[test]
fn docs_cli_md_matches_the_binary() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshid"))
        .arg("help-markdown")
        .output()
        .expect("run meshid help-markdown");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    for part in [
        "## `meshid server run`",
        "## `meshid agent run`",
        "## `meshid sidecar run`",
    ] {
        assert!(generated.contains(part), "reference lacks {part}");
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
    if std::env::var_os("MESHID_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/cli.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/cli.md is stale: run `MESHID_BLESS=1 cargo test --test cli_reference`"
    );
}
