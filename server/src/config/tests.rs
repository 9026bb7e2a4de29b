use super::*;

#[test]
fn k8s_psat_section() {
    let base = "trust_domain = \"example.org\"\n[node_attestor.k8s_psat]\n";
    let c = ServerConfig::parse(&format!(
        "{base}cluster = \"demo\"\nservice_accounts = [\"meshid-system:meshid-agent\"]\n"
    ))
    .expect("parses");
    let p = c.node_attestor.k8s_psat.expect("psat");
    assert_eq!(p.audience, "meshid-server");
    assert_eq!(
        p.token_path,
        PathBuf::from(meshid_identity::kube::IN_CLUSTER_TOKEN)
    );
    for (bad, needle) in [
        (
            "cluster = \"demo\"\nservice_accounts = []",
            "service_accounts is empty",
        ),
        ("cluster = \"a/b\"\nservice_accounts = [\"a:b\"]", "cluster"),
        (
            "cluster = \"demo\"\nservice_accounts = [\"agent\"]",
            "namespace:name",
        ),
        (
            "cluster = \"demo\"\nservice_accounts = [\"a:b\"]\napi_server = \"http://x\"",
            "https://",
        ),
        (
            "cluster = \"demo\"\nservice_accounts = [\"a:b\"]\nalias_id = \"spiffe://other.org/x\"",
            "not in trust domain",
        ),
        (
            "cluster = \"demo\"\nservice_accounts = [\"a:b\"]\ntokn = \"x\"",
            "tokn",
        ),
    ] {
        let e = ServerConfig::parse(&format!("{base}{bad}\n")).expect_err(bad);
        assert!(e.to_string().contains(needle), "{bad}: {e}");
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = ServerConfig::parse("trust_domain = \"example.org\"").expect("parses");
    assert_eq!(c.default_svid_ttl, Duration::from_secs(3600));
    // Defaults that can overlap: a 7-day CA, SVIDs of at most a day.
    assert_eq!(c.max_svid_ttl, Duration::from_secs(86400));
    assert_eq!(c.ca_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.store, StoreConfig::Sqlite { path: None });
    assert!(c.ca.automatic);
    assert_eq!(c.journal_retention, Duration::from_secs(86400));
}

#[test]
fn lifetimes_that_cannot_overlap_are_refused() {
    // The short lifetimes tests use are fine.
    let c = ServerConfig::parse(
        "trust_domain = \"td\"\nca_ttl = \"60s\"\nmax_svid_ttl = \"8s\"\ndefault_svid_ttl = \"8s\"\nagent_svid_ttl = \"8s\"\ndefault_jwt_svid_ttl = \"8s\"",
    )
    .expect("60 s CA with 8 s SVIDs");
    assert_eq!(c.x509_policy().publish_before_use, Duration::from_secs(8));
    let e = ServerConfig::parse("trust_domain = \"td\"\nca_ttl = \"36h\"")
        .expect_err("36 h CA with 24 h SVIDs cannot overlap");
    assert!(e.to_string().contains("at least twice max_svid_ttl"), "{e}");
    let e = ServerConfig::parse("trust_domain = \"td\"\n[ca]\nprepare_at = 0.9\nactivate_by = 0.5")
        .expect_err("activation before preparation");
    assert!(e.to_string().contains("prepare_at"), "{e}");
    let e = ServerConfig::parse("trust_domain = \"td\"\n[upstream]\nwarn_before = \"1d\"")
        .expect_err("upstream without certificate or bundle");
    assert!(e.to_string().contains("bundle_path"), "{e}");
}

#[test]
fn durations_and_store() {
    let c = ServerConfig::parse(
        "trust_domain = \"td\"\ndefault_svid_ttl = \"30s\"\nca_ttl = \"2d\"\n[store]\nkind = \"sqlite\"\npath = \"/tmp/x.db\"\n",
    )
    .expect("parses");
    assert_eq!(c.default_svid_ttl, Duration::from_secs(30));
    assert_eq!(c.ca_ttl, Duration::from_secs(2 * 86400));
    let c = ServerConfig::parse("trust_domain = \"td\"\njournal_retention = \"0s\"").expect("0s");
    assert_eq!(c.journal_retention, Duration::ZERO);
    let e = ServerConfig::parse("trust_domain = \"td\"\njournal_retention = \"20years\"")
        .expect_err("too long");
    assert!(e.to_string().contains("journal_retention"), "{e}");
}

#[test]
fn audit_section_and_key_exchange() {
    let c = ServerConfig::parse("trust_domain = \"td\"").expect("parses");
    assert_eq!(c.audit, crate::audit::AuditSettings::default());
    assert_eq!(
        c.tls_key_exchange,
        meshid_identity::crypto::KeyExchange::HybridPreferred
    );
    let c = ServerConfig::parse(
        "trust_domain = \"td\"\ntls_key_exchange = \"hybrid-required\"\n[audit]\nmax_file_size = \"2MiB\"\nmax_files = 3\nseal_every_records = 10\nseal_every = \"5s\"\n",
    )
    .expect("parses");
    assert_eq!(c.audit.max_file_size, 2 << 20);
    assert_eq!(c.audit.max_files, 3);
    assert_eq!(c.audit.seal_every_records, 10);
    assert_eq!(c.audit.seal_every, Duration::from_secs(5));
    assert_eq!(
        c.tls_key_exchange,
        meshid_identity::crypto::KeyExchange::HybridRequired
    );
    for (bad, needle) in [
        ("tls_key_exchange = \"pq\"", "tls_key_exchange"),
        ("[audit]\nmax_file_size = \"2 parsecs\"", "max_file_size"),
        ("[audit]\nmax_file_size = 10", "max_file_size"),
        ("[audit]\nseal_every_records = 0", "seal_every_records"),
        ("[audit]\nseal_every = \"0s\"", "seal_every"),
        ("[audit]\nmax_filez = 3", "max_filez"),
    ] {
        let e = ServerConfig::parse(&format!("trust_domain = \"td\"\n{bad}\n")).expect_err(bad);
        assert!(e.to_string().contains(needle), "{bad}: {e}");
    }
}

#[test]
fn postgres_store() {
    let base = "trust_domain = \"td\"\n[store]\nkind = \"postgres\"\n";
    let c = ServerConfig::parse(&format!(
        "{base}url = \"postgres://m:secret@db/meshid\"\npool_size = 4\nssl_mode = \"verify-full\"\nssl_root_cert = \"/etc/ca.pem\"\n"
    ))
    .expect("parses");
    let o = c.store.postgres_options().expect("postgres");
    assert_eq!(o.pool_size, 4);
    assert_eq!(o.ssl_mode, Some(crate::store::SslMode::VerifyFull));
    assert_eq!(o.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
    assert!(
        !format!("{c:?}").contains("secret"),
        "the URL is not in Debug"
    );
    let d = ServerConfig::parse(&format!("{base}url = \"postgres://db/m\"\n")).expect("defaults");
    let o = d.store.postgres_options().expect("postgres");
    assert_eq!((o.pool_size, o.ssl_mode, o.ssl_root_cert), (10, None, None));
    for (bad, needle) in [
        ("url = \"mysql://db/m\"", "postgres://"),
        ("url = \"postgres://db/m\"\npool_size = 0", "pool_size"),
        (
            "url = \"postgres://db/m\"\nssl_mode = \"sometimes\"",
            "sometimes",
        ),
        (
            "url = \"postgres://db/m\"\nssl_mode = \"disable\"\nssl_root_cert = \"/x\"",
            "ssl_root_cert",
        ),
        ("url = \"postgres://db/m\"\npath = \"/x\"", "path"),
    ] {
        let e = ServerConfig::parse(&format!("{base}{bad}\n")).expect_err(bad);
        assert!(e.to_string().contains(needle), "{bad}: {e}");
    }
}

#[test]
fn unknown_key_is_an_error() {
    let e = ServerConfig::parse("trust_domain = \"td\"\nbind_adress = \"1.2.3.4:1\"")
        .expect_err("unknown key");
    assert!(e.to_string().contains("bind_adress"), "{e}");
}

#[test]
fn bad_trust_domain_and_ttls() {
    assert!(ServerConfig::parse("trust_domain = \"Bad TD\"").is_err());
    assert!(
        ServerConfig::parse(
            "trust_domain = \"td\"\ndefault_svid_ttl = \"8d\"\nmax_svid_ttl = \"7d\""
        )
        .is_err()
    );
}
