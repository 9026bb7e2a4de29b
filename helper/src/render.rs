//! What goes into each file, from one X.509 context: pure, no I/O.

use std::time::SystemTime;

use meshid_identity::pem;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::HelperConfig;

/// Errors turning an X.509 context into files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenderError {
    /// The SVID has no certificate.
    #[error("the SVID has no certificate")]
    EmptyChain,
    /// The PKCS#12 keystore could not be built.
    #[error("PKCS#12: {0}")]
    Pkcs12(String),
}

/// One SVID with the bundles the workload may see.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The SVID's chain, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// The SVID's private key (PKCS#8 DER).
    pub key_pkcs8: Vec<u8>,
    /// The SVID's own trust domain.
    pub trust_domain: String,
    /// Every bundle, by trust domain (DER authorities).
    pub bundles: Vec<(String, Vec<Vec<u8>>)>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("chain", &self.chain.len())
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A file to write: name inside `cert_dir`, content and mode.
#[derive(Clone, PartialEq, Eq)]
pub struct OutFile {
    /// File name inside `cert_dir`.
    pub name: String,
    /// Content.
    pub data: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// Whether `data` changes on every rendering (PKCS#12 salts) and so is
    /// left out of change detection.
    pub randomized: bool,
}

impl std::fmt::Debug for OutFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Content may be a private key: never printed.
        f.debug_struct("OutFile")
            .field("name", &self.name)
            .field("len", &self.data.len())
            .field("mode", &format_args!("{:#o}", self.mode))
            .finish()
    }
}

/// The files for one X.509 context.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The files, in the order they are written.
    pub files: Vec<OutFile>,
    /// The leaf's serial (hex), for logs.
    pub serial: String,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// Authorities left out of the bundle file because they have expired.
    pub expired_dropped: usize,
}

impl Rendered {
    /// Whether `other` has the same content (randomized files aside).
    pub fn same_as(&self, other: &Rendered) -> bool {
        let key = |r: &Rendered| {
            r.files
                .iter()
                .map(|f| {
                    (
                        f.name.clone(),
                        f.mode,
                        (!f.randomized).then(|| f.data.clone()),
                    )
                })
                .collect::<Vec<_>>()
        };
        key(self) == key(other)
    }
}

/// Whether a DER certificate is still valid at `now` (unparseable: not).
fn unexpired(der: &[u8], now: SystemTime) -> bool {
    match X509Certificate::from_der(der) {
        Ok((_, c)) => meshid_identity::svid::to_system_time(c.validity().not_after) > now,
        Err(_) => false,
    }
}

/// The bundle file's authorities: the own trust domain's, then (if asked)
/// the federated ones by name, expired ones left out, each once.
fn bundle_ders(cfg: &HelperConfig, m: &Material, now: SystemTime) -> (Vec<Vec<u8>>, usize) {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut dropped = 0;
    let mut push = |d: &Vec<u8>, out: &mut Vec<Vec<u8>>| {
        if !unexpired(d, now) {
            dropped += 1;
        } else if !out.contains(d) {
            out.push(d.clone());
        }
    };
    for (td, ders) in &m.bundles {
        if *td == m.trust_domain {
            ders.iter().for_each(|d| push(d, &mut out));
        }
    }
    if cfg.x509.include_federated_domains {
        let mut others: Vec<_> = m
            .bundles
            .iter()
            .filter(|(td, _)| *td != m.trust_domain)
            .collect();
        others.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, ders) in others {
            ders.iter().for_each(|d| push(d, &mut out));
        }
    }
    if cfg.x509.add_intermediates_to_bundle {
        for d in m.chain.iter().skip(1) {
            push(d, &mut out);
        }
    }
    (out, dropped)
}

fn pkcs12(m: &Material, bundle: &[Vec<u8>], password: &str) -> Result<Vec<u8>, RenderError> {
    use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
    let err = |e: p12_keystore::error::Error| RenderError::Pkcs12(e.to_string());
    let key = PrivateKey::from_der(&m.key_pkcs8).map_err(err)?;
    let certs = m
        .chain
        .iter()
        .map(|d| Certificate::from_der(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let mut ks = KeyStore::new();
    ks.add_entry(
        "svid",
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new("svid", key, certs)),
    );
    for (i, d) in bundle.iter().enumerate() {
        let c = Certificate::from_der(d).map_err(err)?;
        ks.add_entry(&format!("bundle-{i}"), KeyStoreEntry::Certificate(c));
    }
    ks.writer(password).write().map_err(err)
}

/// Renders the configured X.509 files for `m` at `now`.
pub fn render(cfg: &HelperConfig, m: &Material, now: SystemTime) -> Result<Rendered, RenderError> {
    let leaf = m.chain.first().ok_or(RenderError::EmptyChain)?;
    let (serial, not_after) = match meshid_identity::svid::SvidInfo::from_der(leaf) {
        Ok(i) => (i.serial, i.not_after),
        Err(_) => (String::new(), now),
    };
    let x = &cfg.x509;
    let (bundle, expired_dropped) = bundle_ders(cfg, m, now);
    let svid_ders: Vec<&[u8]> = if x.add_intermediates_to_bundle {
        vec![leaf.as_slice()]
    } else {
        m.chain.iter().map(Vec::as_slice).collect()
    };
    let chain_pem = pem::encode_certs(svid_ders.iter().copied());
    let key_pem = pem::encode("PRIVATE KEY", &m.key_pkcs8);
    let mut files = Vec::new();
    let mut add = |name: &Option<String>, data: Vec<u8>, mode: u32, randomized: bool| {
        if let Some(n) = name {
            files.push(OutFile {
                name: n.clone(),
                data,
                mode,
                randomized,
            });
        }
    };
    add(
        &x.bundle,
        pem::encode_certs(bundle.iter().map(Vec::as_slice)).into_bytes(),
        cfg.cert_mode,
        false,
    );
    add(
        &x.svid,
        chain_pem.clone().into_bytes(),
        cfg.cert_mode,
        false,
    );
    add(&x.key, key_pem.clone().into_bytes(), cfg.key_mode, false);
    add(
        &x.combined,
        format!(
            "{}{key_pem}",
            pem::encode_certs(m.chain.iter().map(Vec::as_slice))
        )
        .into_bytes(),
        cfg.key_mode,
        false,
    );
    if x.pkcs12.is_some() {
        let p = pkcs12(m, &bundle, &cfg.pkcs12_password)?;
        add(&x.pkcs12, p, cfg.key_mode, true);
    }
    Ok(Rendered {
        files,
        serial,
        not_after,
        expired_dropped,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{ConfigFormat, HelperConfig};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use std::path::Path;

    fn ca(days: i64) -> (Vec<u8>, Issuer<'static, KeyPair>) {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(10);
        p.not_after = now + time::Duration::days(days);
        let k = KeyPair::generate().unwrap();
        let der = p.self_signed(&k).unwrap().der().to_vec();
        (der, Issuer::new(p, k))
    }

    fn material() -> (Material, Vec<u8>, Vec<u8>) {
        let (live, issuer) = ca(30);
        let (expired, _) = ca(-1);
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.subject_alt_names = vec![SanType::URI("spiffe://example.org/w".try_into().unwrap())];
        let k = KeyPair::generate().unwrap();
        let leaf = p.signed_by(&k, &issuer).unwrap().der().to_vec();
        let (fed, _) = ca(30);
        (
            Material {
                chain: vec![leaf],
                key_pkcs8: k.serialize_der(),
                trust_domain: "example.org".into(),
                bundles: vec![
                    ("example.org".into(), vec![expired.clone(), live.clone()]),
                    ("partner.org".into(), vec![fed.clone()]),
                ],
            },
            live,
            fed,
        )
    }

    fn cfg(extra: &str) -> HelperConfig {
        HelperConfig::parse(
            &format!(
                "cert_dir = \"c\"\nsvid_file_name = \"s.pem\"\nsvid_key_file_name = \"k.pem\"\nsvid_bundle_file_name = \"b.pem\"\nsvid_combined_file_name = \"sk.pem\"\n{extra}"
            ),
            ConfigFormat::Hcl,
            Path::new("x"),
        )
        .unwrap()
    }

    #[test]
    fn expired_authorities_are_left_out_of_the_bundle() {
        let (m, live, fed) = material();
        let r = render(&cfg(""), &m, SystemTime::now()).unwrap();
        assert_eq!(r.expired_dropped, 1);
        let b = &r.files.iter().find(|f| f.name == "b.pem").unwrap().data;
        assert_eq!(pem::parse_certs(b).unwrap(), vec![live.clone().into()]);
        // Federated authorities only when asked for.
        let r = render(
            &cfg("include_federated_domains = true"),
            &m,
            SystemTime::now(),
        )
        .unwrap();
        let b = &r.files.iter().find(|f| f.name == "b.pem").unwrap().data;
        assert_eq!(pem::parse_certs(b).unwrap(), vec![live.into(), fed.into()]);
    }

    #[test]
    fn combined_file_holds_chain_then_key_and_modes_apply() {
        let (m, _, _) = material();
        let r = render(&cfg(""), &m, SystemTime::now()).unwrap();
        let c = r.files.iter().find(|f| f.name == "sk.pem").unwrap();
        assert_eq!(c.mode, 0o600);
        let text = String::from_utf8(c.data.clone()).unwrap();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(text.contains("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            r.files.iter().find(|f| f.name == "k.pem").unwrap().mode,
            0o600
        );
        assert_eq!(
            r.files.iter().find(|f| f.name == "s.pem").unwrap().mode,
            0o644
        );
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn pkcs12_reads_back_with_its_password() {
        let (m, _, _) = material();
        let c = cfg("pkcs12_file_name = \"s.p12\"\npkcs12_password = \"changeit\"");
        let r = render(&c, &m, SystemTime::now()).unwrap();
        let p = r.files.iter().find(|f| f.name == "s.p12").unwrap();
        assert!(p.randomized);
        let ks = p12_keystore::KeyStore::from_pkcs12(
            &p.data,
            "changeit",
            p12_keystore::Pkcs12ImportPolicy::default(),
        )
        .unwrap();
        let (_, chain) = ks.private_key_chain().unwrap();
        assert_eq!(chain.key().as_der(), m.key_pkcs8.as_slice());
        assert_eq!(chain.certs()[0].as_der(), m.chain[0].as_slice());
        assert!(
            p12_keystore::KeyStore::from_pkcs12(
                &p.data,
                "wrong",
                p12_keystore::Pkcs12ImportPolicy::default()
            )
            .is_err()
        );
        // Same material again: same content apart from the keystore's salt.
        let again = render(&c, &m, SystemTime::now()).unwrap();
        assert!(again.same_as(&r));
    }
}
