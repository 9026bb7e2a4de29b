//! The tamper-evident audit log, with the real server and the real
//! `meshid server audit verify`: the chain continues across a restart and a
//! rotation; every kind of damage is named with its file, line and sequence
//! number; garbage never panics; two servers on one store keep two chains;
//! 10,000 records verify.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Server, meshid, write_server_config};
use meshid_server::audit::record::{self, GENESIS};
use meshid_server::audit::seal::{SealKey, Sealer};
use meshid_server::audit::{AuditLog, AuditSettings, Event};
use meshid_server::store::prelude::*;
use meshid_server::store::{AuditSeal, SqliteStore, Store};

/// `meshid server audit verify --config cfg [--file f]...`: (success, stdout, stderr).
fn verify(cfg: &Path, files: &[PathBuf]) -> (bool, String, String) {
    let mut cmd = meshid();
    cmd.args(["server", "audit", "verify", "--config"]).arg(cfg);
    for f in files {
        cmd.arg("--file").arg(f);
    }
    let out = cmd.output().expect("run verify");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stderr.contains("panicked"),
        "verify panicked:\n{stdout}\n{stderr}"
    );
    (out.status.success(), stdout, stderr)
}

/// Verify must fail and name exactly this place and kind.
fn expect_damage(cfg: &Path, files: &[PathBuf], file: &Path, line: u64, seq: u64, kind: &str) {
    let (ok, out, err) = verify(cfg, files);
    assert!(!ok, "{kind}: verify passed:\n{out}");
    let want = format!("{}:{line}: seq {seq}: {kind}: ", file.display());
    assert!(err.contains(&want), "{kind}: want {want:?} in:\n{err}");
}

fn files_of(data: &Path) -> Vec<PathBuf> {
    record::log_files(&data.join("audit.log")).expect("log files")
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .expect("read")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Copies `files` into a fresh directory, lets `damage` edit the lines of
/// each file, and returns the copies (same order).
fn damaged(
    files: &[PathBuf],
    damage: impl FnOnce(&mut Vec<Vec<String>>),
) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut contents: Vec<Vec<String>> = files.iter().map(|f| read_lines(f)).collect();
    damage(&mut contents);
    let mut out = Vec::new();
    for (f, lines) in files.iter().zip(contents) {
        let p = dir.path().join(f.file_name().expect("name"));
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&p, text).expect("write copy");
        out.push(p);
    }
    (dir, out)
}

fn seq_of(line: &str) -> u64 {
    record::parse(line.as_bytes()).expect("record").head.seq
}

fn create_entries(server: &Server, from: usize, n: usize) {
    for i in from..from + n {
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &format!("spiffe://{}/node", common::TD),
            "--spiffe-id",
            &format!("spiffe://{}/w{i}", common::TD),
            "--selector",
            &format!("unix:uid:{i}"),
        ]);
    }
}

#[test]
fn chain_continues_across_restart_and_rotation_and_every_damage_is_named() {
    let mut server =
        Server::start("[audit]\nmax_file_size = \"4KiB\"\nmax_files = 0\nseal_every_records = 5\n");
    let data = server.dir.path().join("data");
    create_entries(&server, 0, 30);
    server.restart();
    create_entries(&server, 30, 10);
    server.stop();
    let cfg = server.config.clone();

    // Intact: every record, across the rotated files and the restart.
    let files = files_of(&data);
    assert!(files.len() >= 3, "rotation made files: {files:?}");
    let (ok, out, err) = verify(&cfg, &[]);
    assert!(ok, "verify failed:\n{out}\n{err}");
    let all: Vec<String> = files.iter().flat_map(|f| read_lines(f)).collect();
    assert!(
        out.contains(&format!("{} records (seq 1..{})", all.len(), all.len())),
        "{out}"
    );
    assert!(
        out.contains("seal(s) checked") && !out.contains(" 0 seal(s)"),
        "{out}"
    );
    // The restart continued the chain: its first record is not seq 1.
    let reloaded = all
        .iter()
        .find(|l| l.contains("\"event\":\"ca_loaded\""))
        .expect("ca_loaded after restart");
    assert!(seq_of(reloaded) > 30, "{reloaded}");
    // Rotation continued it: each file's first record links to the last of the one before.
    for pair in files.windows(2) {
        let last = read_lines(&pair[0]).pop().expect("last");
        let first = read_lines(&pair[1]).into_iter().next().expect("first");
        let p = record::parse(first.as_bytes()).expect("first record");
        assert_eq!(p.prev, record::hash(last.as_bytes()));
        assert_eq!(p.head.seq, seq_of(&last) + 1);
    }
    // The JSON report says the same.
    let json = meshid()
        .args(["server", "audit", "verify", "--output", "json", "--config"])
        .arg(&cfg)
        .output()
        .expect("verify json");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json report");
    assert_eq!(report["intact"], true);
    assert_eq!(report["records"], all.len());

    // Each kind of damage, on copies, named at its place. Line k of the first
    // file is seq k.
    let first = |c: &Vec<PathBuf>| c[0].clone();
    let (_d, c) = damaged(&files, |f| {
        f[0][9] = f[0][9].replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    });
    expect_damage(&cfg, &c, &first(&c), 10, 10, "edited");

    let (_d, c) = damaged(&files, |f| {
        let copy = f[0][9].clone();
        f[0].insert(12, copy);
    });
    expect_damage(&cfg, &c, &first(&c), 13, 10, "inserted");

    let (_d, c) = damaged(&files, |f| {
        // A forged record that takes seq 11's place and links correctly.
        let prev = record::hex32(&record::hash(f[0][9].as_bytes()));
        let forged = format!(
            "{{\"seq\":11,\"prev\":\"{prev}\",\"event\":\"entry_deleted\",\"ts\":\"2026-01-01T00:00:00Z\"}}"
        );
        f[0].insert(10, forged);
    });
    expect_damage(&cfg, &c, &first(&c), 11, 11, "inserted");

    let (_d, c) = damaged(&files, |f| f[0].swap(9, 10));
    expect_damage(&cfg, &c, &first(&c), 10, 11, "reordered");

    let (_d, c) = damaged(&files, |f| {
        f[0].remove(9);
    });
    expect_damage(&cfg, &c, &first(&c), 10, 11, "deleted");

    // A whole file in the middle deleted.
    let mut without_middle = files.clone();
    let middle = without_middle.remove(1);
    let next_first = seq_of(&read_lines(&files[2])[0]);
    let (ok, _, err) = verify(&cfg, &without_middle);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}:1: seq {next_first}: deleted: records seq {}..{} are missing",
            files[2].display(),
            seq_of(&read_lines(&middle)[0]),
            next_first - 1
        )),
        "{err}"
    );

    // The tail cut before the last seal (the shutdown sealed the last record):
    // the last two records go.
    let last_seq = all.len() as u64;
    let (_d, c) = damaged(&files, |f| {
        for _ in 0..2 {
            while f.last().is_some_and(Vec::is_empty) {
                f.pop();
            }
            f.last_mut().expect("lines").pop();
        }
        while f.last().is_some_and(Vec::is_empty) {
            f.pop();
        }
    });
    let c: Vec<PathBuf> = c
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
        .collect();
    let tail = c.last().expect("files");
    expect_damage(
        &cfg,
        &c,
        tail,
        read_lines(tail).len() as u64,
        last_seq - 2,
        "tail cut",
    );

    // The oldest file deleted: the start of the chain is missing.
    let (ok, _, err) = verify(&cfg, &files[1..]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}:1: seq {}: deleted",
            files[1].display(),
            seq_of(&read_lines(&files[1])[0])
        )),
        "{err}"
    );

    // Garbage, binary and empty files: a clear error, never a panic.
    let junk = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[u8], &str); 5] = [
        (
            "garbage.log",
            b"this is not an audit log\n",
            "not an audit record",
        ),
        (
            "binary.log",
            &[0x7f, b'E', b'L', b'F', 0, 1, 2, 3, 0xff, 0xfe, b'\n', 0],
            "binary data",
        ),
        ("empty.log", b"", "empty"),
        (
            "unchained.log",
            b"{\"ts\":\"2026-01-01T00:00:00Z\",\"event\":\"x\"}\n",
            "unchained",
        ),
        ("array.log", b"[1,2,3]\n", "not an audit record"),
    ];
    for (name, bytes, needle) in cases {
        let p = junk.path().join(name);
        std::fs::write(&p, bytes).expect("write junk");
        let (ok, out, err) = verify(&cfg, std::slice::from_ref(&p));
        assert!(!ok, "{name}: {out}");
        assert!(err.contains(needle), "{name}: want {needle:?} in {err}");
        assert!(err.contains(&p.display().to_string()), "{name}: {err}");
    }
    let huge = junk.path().join("huge.log");
    std::fs::write(&huge, vec![b'x'; 17 << 20]).expect("write huge");
    let (ok, _, err) = verify(&cfg, &[huge]);
    assert!(!ok && err.contains("longer than"), "{err}");

    // The tail cut while the server is down: the server notices its newest
    // seal lies beyond the log, continues the chain from the seal and says
    // so; verify reports the gap.
    let current = data.join("audit.log");
    let mut lines = read_lines(&current);
    let cut = lines.len().min(2) as u64;
    assert!(cut > 0, "the current file holds records");
    lines.truncate(lines.len() - cut as usize);
    let text = if lines.is_empty() {
        String::new()
    } else {
        lines.join("\n") + "\n"
    };
    std::fs::write(&current, text).expect("cut tail");
    server.restart();
    server.stop();
    assert!(
        server
            .log()
            .contains("the audit log ends before its newest seal"),
        "{}",
        server.log()
    );
    let missing = if cut == 1 {
        format!("record seq {last_seq} is missing")
    } else {
        format!("records seq {}..{last_seq} are missing", last_seq - 1)
    };
    let (ok, _, err) = verify(&cfg, &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!("seq {}: deleted: {missing}", last_seq + 1)),
        "{err}"
    );
}

#[tokio::test]
async fn forged_and_foreign_seals_are_reported() {
    let mut server = Server::start("[audit]\nseal_every_records = 3\n");
    create_entries(&server, 0, 6);
    server.stop();
    let data = server.dir.path().join("data");
    let cfg = server.config.clone();
    assert!(verify(&cfg, &[]).0);

    let store = SqliteStore::open(&data.join("meshid.db"))
        .await
        .expect("store");
    let key = SealKey::load(&data).expect("seal key");
    let genuine = store
        .latest_audit_seal(key.chain_id())
        .await
        .expect("seals")
        .expect("a seal");

    // A seal whose signature does not cover its fields.
    let forged = AuditSeal {
        seq: genuine.seq + 100,
        ..genuine.clone()
    };
    store.put_audit_seal(&forged).await.expect("insert forged");
    let (ok, _, err) = verify(&cfg, &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!("seq {}: forged seal: ", forged.seq))
            && err.contains("signature does not verify"),
        "{err}"
    );
    drop(store);

    // A genuine seal made with another server's key, filed under ours.
    let mut server = Server::start("");
    server.stop();
    let other = SealKey::load(&server.dir.path().join("data")).expect("other key");
    let store = SqliteStore::open(&data.join("meshid.db"))
        .await
        .expect("store");
    let mut foreign = other.seal(1, &GENESIS, 1, "records");
    foreign.server_id = key.chain_id().to_string();
    foreign.seq = genuine.seq + 200;
    store
        .put_audit_seal(&foreign)
        .await
        .expect("insert foreign");
    let err = verify(&cfg, &[]).2;
    assert!(err.contains("forged seal"), "{err}");
}

#[test]
fn rotation_prunes_the_oldest_file_and_records_it() {
    let mut server =
        Server::start("[audit]\nmax_file_size = \"4KiB\"\nmax_files = 2\nseal_every_records = 4\n");
    create_entries(&server, 0, 40);
    server.stop();
    let data = server.dir.path().join("data");
    let files = files_of(&data);
    assert_eq!(files.len(), 2, "{files:?}");
    let first = seq_of(&read_lines(&files[0])[0]);
    assert!(first > 1, "the oldest records were pruned");
    let (ok, out, err) = verify(&server.config, &[]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "records 1..{} were deleted by rotation",
            first - 1
        )),
        "{out}"
    );
}

#[test]
fn two_servers_on_one_store_keep_two_chains() {
    let shared = tempfile::tempdir().expect("tempdir");
    let store_cfg = format!(
        "[store]\nkind = \"sqlite\"\npath = \"{}\"\n[audit]\nseal_every_records = 2\n",
        shared.path().join("shared.db").display()
    );
    let mut a = Server::start(&store_cfg);
    let mut b = Server::start(&store_cfg);
    create_entries(&a, 0, 5);
    create_entries(&b, 100, 7);
    a.stop();
    b.stop();
    let (ok, out_a, err) = verify(&a.config, &[]);
    assert!(ok, "{out_a}{err}");
    let (ok, out_b, err) = verify(&b.config, &[]);
    assert!(ok, "{out_b}{err}");
    let id = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("chain id: "))
            .expect("chain id")
            .to_string()
    };
    assert_ne!(id(&out_a), id(&out_b));

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (sa, sb) = rt.block_on(async {
        let s = SqliteStore::open(&shared.path().join("shared.db"))
            .await
            .expect("store");
        (
            s.list_audit_seals(&id(&out_a)).await.expect("a"),
            s.list_audit_seals(&id(&out_b)).await.expect("b"),
        )
    });
    assert!(!sa.is_empty() && !sb.is_empty());
    assert!(sa.iter().all(|s| s.public_key != sb[0].public_key));
    // One server's seals do not vouch for the other's log.
    let (ok, _, _) = verify(&b.config, &files_of(&a.dir.path().join("data")));
    assert!(!ok, "B's seals accepted A's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_verify_and_one_edit_among_them_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_server_config(
        dir.path(),
        "[audit]\nmax_file_size = \"512KiB\"\nmax_files = 0\n",
    );
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let settings = AuditSettings {
        max_file_size: 512 << 10,
        max_files: 0,
        ..AuditSettings::default()
    };
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&data.join("meshid.db"))
            .await
            .expect("store"),
    );
    let log = AuditLog::open_with(&data.join("audit.log"), &settings).expect("log");
    let (key, _) = SealKey::load_or_create(&data).expect("key");
    let sealer = Sealer::start(key, store, log.clone())
        .await
        .expect("sealer");
    for batch in 0..100 {
        let events = (0..100)
            .map(|i| {
                Event::new("x509_svid_issued")
                    .with("serial", format!("{:032x}", batch * 100 + i))
                    .with("spiffe_id", format!("spiffe://example.org/w{i}"))
                    .with("agent", "spiffe://example.org/meshid/agent/join_token/x")
            })
            .collect();
        log.record(events).await.expect("record");
        if batch % 10 == 9 {
            sealer.seal("records").await;
        }
    }
    assert_eq!(sealer.close().await, None, "already sealed at 10,000");
    let sealed = SealKey::load(&data).expect("key");
    assert_eq!(sealed.chain_id(), sealer.chain_id());
    assert_eq!(log.head().seq, 10_000);
    drop(log);

    let (ok, out, err) = verify(&cfg, &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("10000 records (seq 1..10000)"), "{out}");
    let seals: usize = out
        .lines()
        .next()
        .unwrap_or_default()
        .split(", ")
        .find_map(|p| p.strip_suffix(" seal(s) checked"))
        .and_then(|n| n.trim().parse().ok())
        .expect("seal count");
    assert!(seals >= 10, "{out}");

    // One edit in the middle of 10,000.
    let files = files_of(&data);
    assert!(files.len() > 2);
    let (fi, li) = {
        let mut seen = 0usize;
        let mut at = (0, 0);
        for (i, f) in files.iter().enumerate() {
            let n = read_lines(f).len();
            if seen + n >= 5000 {
                at = (i, 5000 - seen - 1);
                break;
            }
            seen += n;
        }
        at
    };
    let (_d, c) = damaged(&files, |f| {
        f[fi][li] = f[fi][li].replacen("\"serial\":\"0", "\"serial\":\"f", 1);
    });
    expect_damage(&cfg, &c, &c[fi], li as u64 + 1, 5000, "edited");
}
