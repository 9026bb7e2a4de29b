//! The agent's persisted identity on disk, against planted files and
//! crashes: the key never ends world-readable, nothing is written through a
//! symlink, and a restart never loads a key with a certificate it does not
//! belong to.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{AgentProc, Server, TD, meshid, wait_for};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").mode() & 0o7777
}

fn token(server: &Server) -> String {
    server.ok(&[
        "token",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/node/files"),
    ])
}

/// Files and symlinks planted world-readable at the temporary names the
/// agent used to write its key through (`agent_svid.tmp`, shared by key and
/// certificate, opened without O_EXCL and keeping an existing file's mode):
/// the key file still ends 0600, the planted files are untouched, the
/// symlink's target is not written, and the data directory is 0700.
#[test]
fn planted_temp_files_do_not_expose_the_agent_key() {
    let server = Server::start("");
    let dir = server.dir.path().join("agent");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let planted = data.join("agent_svid.tmp");
    std::fs::write(&planted, "").expect("plant");
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let outside = server.dir.path().join("outside.pem");
    std::fs::write(&outside, "untouched").expect("w");
    for name in [
        "bundle.tmp",
        ".agent_identity.pem.tmp",
        "agent_identity.tmp",
        ".agent_svid.key.tmp",
    ] {
        std::os::unix::fs::symlink(&outside, data.join(name)).expect("symlink");
    }

    let agent = AgentProc::start(&dir, &server, Some(&token(&server)));
    let id = data.join("agent_identity.pem");
    wait_for("persisted identity", Duration::from_secs(30), || {
        id.exists().then_some(())
    });
    assert_eq!(mode(&id), 0o600, "identity file (holds the key)");
    let pem = std::fs::read_to_string(&id).expect("read");
    assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("BEGIN PRIVATE KEY"));
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(
        std::fs::read(&planted).expect("r"),
        b"",
        "planted file untouched"
    );
    assert_eq!(mode(&planted), 0o666);
    assert_eq!(std::fs::read(&outside).expect("r"), b"untouched");
    for name in [
        "bundle.tmp",
        ".agent_identity.pem.tmp",
        "agent_identity.tmp",
        ".agent_svid.key.tmp",
    ] {
        assert!(
            std::fs::symlink_metadata(data.join(name))
                .expect("still there")
                .file_type()
                .is_symlink()
        );
    }
    for leftover in std::fs::read_dir(&data).expect("ls") {
        let name = leftover.expect("entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            !name.starts_with(".agent_identity.pem.") || name == ".agent_identity.pem.tmp",
            "temporary file left behind: {name}"
        );
    }
    drop(agent);
}

/// Crash states: a half-written temporary file next to the identity (a
/// crash before the rename) leaves the old identity loadable; the state the
/// previous two-file layout could leave after a crash between its two
/// renames (new key, old certificate) is refused with a clear log instead of
/// being loaded, and a new join token recovers; a matching two-file identity
/// from an earlier version is loaded and moved into the one-file layout.
#[test]
fn crash_states_never_load_a_mismatched_pair() {
    let server = Server::start("");
    let dir = server.dir.path().join("agent");
    let data = dir.join("data");
    let id = data.join("agent_identity.pem");
    let mut agent = AgentProc::start(&dir, &server, Some(&token(&server)));
    wait_for("persisted identity", Duration::from_secs(30), || {
        id.exists().then_some(())
    });
    agent.stop();
    let pem = std::fs::read(&id).expect("read");

    // 1. Crash while writing the next identity: the temp file is partial.
    std::fs::write(
        data.join(".agent_identity.pem.0123456789abcdef.tmp"),
        &pem[..pem.len() / 2],
    )
    .expect("w");
    let seen = agent.log().len();
    agent.restart();
    wait_for("resumed", Duration::from_secs(30), || {
        agent.log()[seen..]
            .contains("resuming with persisted agent SVID")
            .then_some(())
    });
    agent.stop();

    // 2. The old layout after a crash between its renames: a new key beside
    //    the old certificate.
    let certs = meshid_identity::pem::parse_certs(&pem).expect("certs");
    std::fs::write(
        data.join("agent_svid.pem"),
        meshid_identity::pem::encode_certs(certs.iter().map(|c| c.as_ref())),
    )
    .expect("w");
    let (other, _) = common::key_and_csr();
    std::fs::write(data.join("agent_svid.key"), other.serialize_pem()).expect("w");
    // As the old layout wrote it: owner-only (a looser key file is refused
    // before its contents are read).
    std::fs::set_permissions(
        data.join("agent_svid.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    std::fs::remove_file(&id).expect("rm");
    let out = meshid()
        .args(["agent", "run", "--config"])
        .arg(dir.join("agent.toml"))
        .stdout(Stdio::null())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "must not start with a mismatched pair"
    );
    assert!(
        stderr.contains("does not belong to the persisted agent SVID"),
        "{stderr}"
    );
    assert!(stderr.contains("no join token"), "{stderr}");
    // A new token recovers.
    let mut recovered = AgentProc::start(&dir, &server, Some(&token(&server)));
    wait_for("new identity", Duration::from_secs(30), || {
        id.exists().then_some(())
    });
    assert!(!data.join("agent_svid.key").exists(), "old key removed");
    assert!(!data.join("agent_svid.pem").exists(), "old cert removed");
    recovered.stop();

    // 3. A matching pair in the old layout is loaded and migrated.
    let pem = std::fs::read(&id).expect("read");
    let certs = meshid_identity::pem::parse_certs(&pem).expect("certs");
    let key = meshid_identity::pem::parse_key(&pem).expect("key");
    std::fs::write(
        data.join("agent_svid.pem"),
        meshid_identity::pem::encode_certs(certs.iter().map(|c| c.as_ref())),
    )
    .expect("w");
    std::fs::write(
        data.join("agent_svid.key"),
        meshid_identity::pem::encode("PRIVATE KEY", key.secret_der()),
    )
    .expect("w");
    std::fs::set_permissions(
        data.join("agent_svid.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    std::fs::remove_file(&id).expect("rm");
    let seen = recovered.log().len();
    recovered.restart();
    wait_for(
        "resumed from the old layout",
        Duration::from_secs(30),
        || {
            recovered.log()[seen..]
                .contains("resuming with persisted agent SVID")
                .then_some(())
        },
    );
}
