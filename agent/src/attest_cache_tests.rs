use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

fn sel(v: String) -> Selector {
    Selector {
        r#type: "unix".into(),
        value: v,
    }
}

fn key() -> ProcessKey {
    ProcessKey {
        pid: 42,
        start_time: 1000,
        exe: ExeId::of_path(Path::new("/proc/self/exe")).expect("exe"),
        uid: 1,
        gid: 1,
    }
}

/// Attests through `cache`, counting attestations in `n`; the selector
/// names the attestation it came from.
async fn attest(cache: &AttestCache, k: ProcessKey, n: &AtomicUsize) -> Vec<String> {
    cache
        .get_or_attest(k, || async {
            let i = n.fetch_add(1, Ordering::SeqCst);
            Ok(vec![sel(format!("attestation:{i}"))])
        })
        .await
        .expect("attest")
        .into_iter()
        .map(|s| s.value)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_attestation_per_process_image_and_ttl() {
    let cache = AttestCache::default();
    let n = AtomicUsize::new(0);
    let k = key();
    assert_eq!(attest(&cache, k, &n).await, ["attestation:0"]);
    // Concurrent and later calls of the same image share it.
    let (a, b) = tokio::join!(attest(&cache, k, &n), attest(&cache, k, &n));
    assert_eq!(
        (a, b),
        (
            vec!["attestation:0".to_string()],
            vec!["attestation:0".to_string()]
        )
    );
    tokio::time::advance(ATTESTATION_TTL - Duration::from_millis(1)).await;
    assert_eq!(attest(&cache, k, &n).await, ["attestation:0"]);
    // Then it is read again.
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(attest(&cache, k, &n).await, ["attestation:1"]);
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// A recycled pid (same pid, another start time), another executable, or
/// other credentials never get the cached selectors.
#[tokio::test(start_paused = true)]
async fn pid_reuse_exec_and_credentials_invalidate() {
    let cache = AttestCache::default();
    let n = AtomicUsize::new(0);
    let k = key();
    assert_eq!(attest(&cache, k, &n).await, ["attestation:0"]);
    let reused = ProcessKey {
        start_time: k.start_time + 1,
        ..k
    };
    assert_eq!(attest(&cache, reused, &n).await, ["attestation:1"]);
    let other_exe = ProcessKey {
        exe: ExeId::of_path(Path::new("/bin/sh")).expect("sh"),
        ..k
    };
    assert_ne!(other_exe.exe, k.exe);
    assert_eq!(attest(&cache, other_exe, &n).await, ["attestation:2"]);
    let other_uid = ProcessKey { uid: 2, ..k };
    assert_eq!(attest(&cache, other_uid, &n).await, ["attestation:3"]);
    let other_gid = ProcessKey { gid: 2, ..k };
    assert_eq!(attest(&cache, other_gid, &n).await, ["attestation:4"]);
    // The first is still served to its own image.
    assert_eq!(attest(&cache, k, &n).await, ["attestation:0"]);
}

#[tokio::test(start_paused = true)]
async fn refusals_are_not_kept() {
    let cache = AttestCache::default();
    let k = key();
    let r = cache
        .get_or_attest(k, || async { Err(AttestError::ImageChanged(42)) })
        .await;
    assert_eq!(r, Err(AttestError::ImageChanged(42)));
    let n = AtomicUsize::new(0);
    assert_eq!(attest(&cache, k, &n).await, ["attestation:0"]);
}

#[tokio::test(start_paused = true)]
async fn capacity_is_bounded() {
    let cache = AttestCache::new(ATTESTATION_TTL, 2);
    let n = AtomicUsize::new(0);
    for pid in 0..5 {
        attest(&cache, ProcessKey { pid, ..key() }, &n).await;
    }
    assert!(cache.slots.lock().expect("lock").len() <= 2);
}

/// Counts attestations; selectors as the unix attestor would give.
struct Counting(AtomicUsize);

impl WorkloadAttestor for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn attest(&self, c: &Caller) -> Result<Vec<Selector>, AttestError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(vec![sel(format!("uid:{}", c.uid))])
    }
}

fn pin(pid: i32) -> Arc<Pinned> {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid).expect("pid"),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    Arc::new(Pinned::take(pid, pidfd, Path::new("/proc")).expect("pin"))
}

/// A real process pinned and attested, then exec'ing another binary: calls
/// with the old pin are refused although its attestation is cached; a new
/// connection (a new pin) is attested afresh.
#[tokio::test]
async fn exec_after_connect_is_refused_with_a_cached_attestation() {
    let mut child = Command::new("sh")
        .args(["-c", "read x; exec cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let pid = i32::try_from(child.id()).expect("pid");
    let counting = Arc::new(Counting(AtomicUsize::new(0)));
    let cache = AttestCache::default();
    let caller = |pinned| Caller {
        pinned: Some(pinned),
        ..Caller::new(Some(pid), 7, 7)
    };
    let before = pin(pid);
    let proc_root = Path::new("/proc");
    for _ in 0..2 {
        let s = cache
            .attest(caller(before.clone()), counting.clone(), proc_root)
            .await
            .expect("attest");
        assert_eq!(s[0].value, "uid:7");
    }
    assert_eq!(counting.0.load(Ordering::SeqCst), 1, "cached");

    // exec: once cat echoes a line, the shell is gone.
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\nping\n").expect("write");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "ping\n");

    let r = cache
        .attest(caller(before.clone()), counting.clone(), proc_root)
        .await;
    assert_eq!(r, Err(AttestError::ImageChanged(pid)));
    let after = pin(pid);
    cache
        .attest(caller(after), counting.clone(), proc_root)
        .await
        .expect("attest the new image");
    assert_eq!(counting.0.load(Ordering::SeqCst), 2, "attested afresh");

    drop(stdin);
    child.wait().expect("wait");
    // The process is gone: refused, cached or not.
    let r = cache
        .attest(caller(before), counting.clone(), proc_root)
        .await;
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn names_are_looked_up_once_per_ttl() {
    let names: Names<u32> = Mutex::new(HashMap::new());
    let ttl = Duration::from_secs(30);
    let t0 = std::time::Instant::now();
    let n = AtomicUsize::new(0);
    let lookup = |id: u32| -> Result<Option<String>, ()> {
        n.fetch_add(1, Ordering::SeqCst);
        Ok(Some(format!("user{id}")))
    };
    let get = |at| NameCache::get(&names, ttl, at, 5, lookup);
    assert_eq!(get(t0).as_deref(), Some("user5"));
    assert_eq!(
        get(t0 + ttl - Duration::from_secs(1)).as_deref(),
        Some("user5")
    );
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(get(t0 + ttl).as_deref(), Some("user5"));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // A failed lookup is not kept.
    let failing = |_: u32| -> Result<Option<String>, ()> { Err(()) };
    assert_eq!(NameCache::get(&names, ttl, t0, 6, failing), None);
    assert!(!names.lock().expect("lock").contains_key(&6));
    // This process's own user resolves like an uncached lookup.
    let uid = nix::unistd::geteuid().as_raw();
    let direct = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name);
    assert_eq!(NameCache::default().user(uid), direct);
}
