use super::*;
use crate::store::SqliteStore;

/// Drives the manager the way the CA loop does (tick, then sleep until
/// the returned next transition, at most 10 s) on a clock that jumps
/// from transition to transition, for many CA lifetimes: there is
/// always a usable active CA and JWT key, each successor is published
/// before it signs, and no transition is ever late.
#[tokio::test]
async fn the_loop_never_sleeps_past_a_transition() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = ServerConfig::parse(&format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nca_ttl = \"60s\"\nmax_svid_ttl = \"8s\"\ndefault_svid_ttl = \"8s\"\nagent_svid_ttl = \"8s\"\ndefault_jwt_svid_ttl = \"8s\"\n",
        dir.path().display()
    ))
    .expect("config");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .expect("store"),
    );
    let audit = AuditLog::open(&dir.path().join("audit.log")).expect("audit");
    let m = CaManager::start(&cfg, store.clone(), audit, Metrics::new())
        .await
        .expect("start");
    let start = SystemTime::now();
    let mut t = start;
    let mut activations = std::collections::HashSet::new();
    while t < start + Duration::from_secs(600) {
        let (next, _) = m.tick(t).await.expect("tick");
        let x = m.signer();
        assert!(x.not_after() > t, "active CA expired at {t:?}");
        assert!(m.jwt_signer().not_after() > t, "active JWT key expired");
        activations.insert(x.id().to_string());
        let material = m.bundle_material(t).await.expect("bundle");
        assert!(!material.x509.roots.is_empty());
        let wake = next
            .map(|(at, _)| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0))
            })
            .unwrap_or(t + Duration::from_secs(10))
            .min(t + Duration::from_secs(10))
            .max(t + Duration::from_millis(200));
        t = wake;
    }
    // A new CA every ~30 s for 10 minutes.
    assert!(activations.len() >= 18, "{}", activations.len());
    // Nothing is late: the journal shows each activation before the
    // predecessor's end.
    let journal = store.list_authorities().await.expect("journal");
    let mut x509: Vec<&Authority> = journal
        .iter()
        .filter(|a| a.kind == X509 && a.activated_at > 0)
        .collect();
    x509.sort_by_key(|a| a.activated_at);
    for w in x509.windows(2) {
        assert!(
            w[1].activated_at < w[0].not_after,
            "{} activated at {} after {} ended at {}",
            w[1].id,
            w[1].activated_at,
            w[0].id,
            w[0].not_after
        );
        assert!(
            w[1].activated_at >= w[1].prepared_at + 8,
            "published too briefly: {:?}",
            x509.iter()
                .map(|a| (
                    a.prepared_at,
                    a.activated_at,
                    a.not_before,
                    a.not_after,
                    &a.state
                ))
                .collect::<Vec<_>>()
        );
    }
}
