//! The chain gate on the offline-upstream path, through the real binary: a
//! CSR for the next intermediate is made by the server, signed here by the
//! "offline" root, and imported. An expired or not-yet-valid intermediate,
//! a path length the root does not allow, and a certificate for a key the
//! server never made are refused with a clear error, and nothing is stored;
//! `--dry-run` stores nothing either; a good one becomes the prepared CA and
//! signs once activated.

mod common;

use std::time::{Duration, SystemTime};

use common::{Server, TD};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::Value;

fn ca_params(cn: &str, path_len: u8, nb: SystemTime, na: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = nb.into();
    p.not_after = na.into();
    p.use_authority_key_identifier_extension = true;
    p
}

/// Signs the server's CSR as an intermediate valid from `nb` to `na`.
fn sign_csr(csr_pem: &str, issuer: &Issuer<'_, KeyPair>, nb: SystemTime, na: SystemTime) -> String {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).expect("CSR parses");
    csr.params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    csr.params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    csr.params.not_before = nb.into();
    csr.params.not_after = na.into();
    csr.params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}").try_into().expect("uri"),
    )];
    csr.params.use_authority_key_identifier_extension = true;
    csr.signed_by(issuer).expect("sign").pem()
}

fn journal(server: &Server) -> Value {
    let mut v: Value =
        serde_json::from_str(&server.ok(&["ca", "show", "--all", "--output", "json"]))
            .expect("json");
    v["next_transition_at"] = Value::Null;
    for a in v["authorities"].as_array_mut().expect("array") {
        a["live_svids"] = Value::Null;
        a["last_svid_not_after"] = Value::Null;
    }
    v
}

fn refused(server: &Server, args: &[&str], needle: &str) {
    let before = journal(server);
    let out = server.cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} must be refused");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
    assert_eq!(journal(server), before, "{args:?} changed the journal");
}

#[test]
fn imported_intermediates_pass_the_gate_or_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tmp");
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    // The root allows one CA below it: the server's intermediate.
    let root_key = KeyPair::generate().expect("key");
    let root_params = ca_params("offline root", 1, now - day, now + day * 365);
    let root = root_params.self_signed(&root_key).expect("root");
    let root_pem = dir.path().join("root.pem");
    let root_key_pem = dir.path().join("root.key");
    std::fs::write(&root_pem, root.pem()).expect("write");
    std::fs::write(&root_key_pem, root_key.serialize_pem()).expect("write");
    let root_issuer = Issuer::new(root_params, root_key);

    let server = Server::start(&format!(
        "[upstream]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        root_pem.display(),
        root_key_pem.display()
    ));
    let csr_path = server.dir.path().join("next.csr");
    let out = server.ok(&[
        "ca",
        "prepare",
        "--upstream-csr",
        csr_path.to_str().expect("path"),
    ]);
    assert!(out.contains("pending"), "{out}");
    let csr = std::fs::read_to_string(&csr_path).expect("CSR written");
    let write = |name: &str, pem: &str| {
        let p = server.dir.path().join(name);
        std::fs::write(&p, pem).expect("write");
        p.to_str().expect("path").to_string()
    };

    // Expired.
    let expired = write(
        "expired.pem",
        &sign_csr(&csr, &root_issuer, now - day * 30, now - day),
    );
    refused(&server, &["ca", "import", "--cert", &expired], "expired");
    // Not yet valid.
    let future = write(
        "future.pem",
        &sign_csr(&csr, &root_issuer, now + day, now + day * 30),
    );
    refused(
        &server,
        &["ca", "import", "--cert", &future],
        "not valid before",
    );
    // Valid, but ends before it could sign SVIDs for their full lifetime.
    let short = write(
        "short.pem",
        &sign_csr(&csr, &root_issuer, now - day, now + day),
    );
    refused(
        &server,
        &["ca", "import", "--cert", &short],
        "full lifetime",
    );
    // A path length the root does not allow: signed by a second intermediate,
    // so two CAs sit below a root whose pathLen is 1.
    let i2_key = KeyPair::generate().expect("key");
    let i2 = ca_params("second intermediate", 1, now - day, now + day * 60)
        .signed_by(&i2_key, &root_issuer)
        .expect("i2");
    let i2_issuer = Issuer::new(
        ca_params("second intermediate", 1, now - day, now + day * 60),
        i2_key,
    );
    let deep = sign_csr(&csr, &i2_issuer, now - day, now + day * 30) + &i2.pem();
    let deep = write("deep.pem", &deep);
    refused(
        &server,
        &["ca", "import", "--cert", &deep],
        "pathLenConstraint",
    );
    // A certificate for a key the server never made.
    let other_key = KeyPair::generate().expect("key");
    let other = ca_params("stranger", 0, now - day, now + day * 30)
        .signed_by(&other_key, &root_issuer)
        .expect("other");
    let other = write("other.pem", &other.pem());
    refused(
        &server,
        &["ca", "import", "--cert", &other],
        "not for a pending authority",
    );

    // A good one: the dry run stores nothing, the import makes it prepared,
    // and once activated it signs.
    let good = write(
        "good.pem",
        &sign_csr(&csr, &root_issuer, now - day, now + day * 30),
    );
    let before = journal(&server);
    let out = server.ok(&["ca", "import", "--cert", &good, "--dry-run"]);
    assert!(
        out.contains("would import") && out.contains("dry run"),
        "{out}"
    );
    assert_eq!(journal(&server), before);
    let out = server.ok(&["ca", "import", "--cert", &good]);
    assert!(out.contains("imported"), "{out}");
    let v = journal(&server);
    let prepared: Vec<&Value> = v["authorities"]
        .as_array()
        .expect("array")
        .iter()
        .filter(|a| a["state"] == "prepared" && a["origin"] == "imported")
        .collect();
    assert_eq!(prepared.len(), 1, "{v}");
    let id = prepared[0]["id"].as_str().expect("id").to_string();
    server.ok(&["ca", "activate", &id]);
    // The server's own SVID is re-issued under it; the bundle still holds the
    // one root, so agents need no new trust.
    let bundle = server.bundle_pem();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    assert!(server.audit().iter().any(|e| e["event"] == "ca_imported"));
    let out = server.ok(&["ca", "check", "--warn", "24h"]);
    assert!(out.contains("trust material OK"), "{out}");
    // A window longer than the upstream root: check fails.
    let out = server.cli(&["ca", "check", "--warn", "800d"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
