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
    // Every narrated value is filled in: no `{name}` placeholder is left.
    let unfilled = placeholders(&stdout);
    assert!(
        unfilled.is_empty(),
        "unfilled placeholders {unfilled:?} in:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "all run as uid {} here",
            nix::unistd::geteuid().as_raw()
        )),
        "step 2 names the real uid:\n{stdout}"
    );
}

/// `{ident}` and `{ident:…}` occurrences: what `format!` leaves behind when a
/// string was printed without being formatted.
fn placeholders(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices('{') {
        let rest = &text[i + 1..];
        let Some(end) = rest.find('}') else { continue };
        let inner = &rest[..end];
        let name = inner.split(':').next().unwrap_or_default();
        let is_ident = !name.is_empty()
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if is_ident && !inner.contains(['"', ' ']) {
            found.push(format!("{{{inner}}}"));
        }
    }
    found
}

#[test]
fn placeholder_scan_finds_unfilled_names() {
    assert_eq!(
        placeholders("uid {uid} and {n:>3} but not {\"a\": 1} or {} or { x }"),
        ["{uid}", "{n:>3}"]
    );
}
