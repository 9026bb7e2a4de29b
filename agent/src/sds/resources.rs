//! Which secrets a caller gets for which SDS resource names.
//!
//! The names are those Envoy configurations written for SPIRE use:
//!
//! | name                          | secret                                               |
//! |-------------------------------|------------------------------------------------------|
//! | a SPIFFE ID of the caller     | `tls_certificate`: that SVID's chain and key          |
//! | `default`                     | `tls_certificate`: the caller's first SVID            |
//! | `ROOTCA`                      | `validation_context`: the agent's trust domain bundle |
//! | `<td>` or `spiffe://<td>`     | `validation_context`: that bundle, if the caller may see it |
//! | `ALL`                         | `validation_context` with the SPIFFE certificate validator holding every bundle the caller may see |
//!
//! An empty list of names asks for everything: every SVID by SPIFFE ID and
//! every bundle by `spiffe://<td>`. Any other name is left out of the answer.

use envoy_types::pb::envoy::config::core::v3::{DataSource, TypedExtensionConfig, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::google::protobuf::Any;
use meshid_identity::pem;
use meshid_proto::types::Bundle;
use prost::{Message, Name};

use crate::cache::CachedSvid;

/// The caller's first SVID.
pub const DEFAULT_SVID: &str = "default";
/// The agent's own trust domain bundle.
pub const ROOT_CA: &str = "ROOTCA";
/// Every bundle the caller may see, for the SPIFFE certificate validator.
pub const ALL_BUNDLES: &str = "ALL";
/// Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// What one caller may be served, taken from one snapshot.
#[derive(Debug, Default)]
pub struct CallerView<'a> {
    /// The caller's SVIDs, in entry order; `None` for an entry whose SVID
    /// is not minted yet (so `default` waits for the first entry's SVID).
    pub svids: Vec<Option<&'a CachedSvid>>,
    /// The agent's own trust domain bundle.
    pub own: Option<&'a Bundle>,
    /// Every bundle the caller may see: the own one first, then the
    /// bundles its entries federate with.
    pub bundles: Vec<&'a Bundle>,
}

/// The answer to one set of names: the secrets found (each as an `Any`, in
/// the order asked), and the names that matched nothing.
#[derive(Debug, Default, PartialEq)]
pub struct Resolved {
    /// Secrets, packed as `google.protobuf.Any`.
    pub resources: Vec<Any>,
    /// Names with no secret for this caller (left out of the answer).
    pub unknown: Vec<String>,
}

impl CallerView<'_> {
    fn svid(&self, id: &str) -> Option<&CachedSvid> {
        self.svids
            .iter()
            .flatten()
            .copied()
            .find(|s| s.spiffe_id == id)
    }

    fn bundle(&self, td: &str) -> Option<&Bundle> {
        self.bundles.iter().copied().find(|b| b.trust_domain == td)
    }

    /// The secret for one name, if there is one.
    fn secret(&self, name: &str) -> Option<Secret> {
        match name {
            DEFAULT_SVID => self.svids.first().copied().flatten().map(|s| tls(name, s)),
            ROOT_CA => self.own.map(|b| trusted_ca(name, b)),
            ALL_BUNDLES => {
                (!self.bundles.is_empty()).then(|| spiffe_validator(name, &self.bundles))
            }
            _ => {
                let rest = meshid_identity::spiffe_id::strip_scheme(name);
                if rest.contains('/') {
                    self.svid(name).map(|s| tls(name, s))
                } else {
                    self.bundle(rest).map(|b| trusted_ca(name, b))
                }
            }
        }
    }

    /// The secrets for `names` (duplicates and empty names ignored); an
    /// empty list asks for everything.
    pub fn resolve(&self, names: &[String]) -> Resolved {
        let mut out = Resolved::default();
        let wanted: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.is_empty())
            .collect();
        if wanted.is_empty() {
            let secrets = self
                .svids
                .iter()
                .flatten()
                .map(|s| tls(&s.spiffe_id, s))
                .chain(self.bundles.iter().map(|b| {
                    trusted_ca(
                        &meshid_identity::spiffe_id::trust_domain_id(&b.trust_domain),
                        b,
                    )
                }));
            out.resources = secrets.map(|s| pack(&s)).collect();
            return out;
        }
        let mut seen = std::collections::HashSet::new();
        for name in wanted {
            if !seen.insert(name) {
                continue;
            }
            match self.secret(name) {
                Some(s) => out.resources.push(pack(&s)),
                None => out.unknown.push(name.to_string()),
            }
        }
        out
    }
}

/// The type URL of every resource SDS serves.
pub fn secret_type_url() -> String {
    Secret::type_url()
}

fn pack(s: &Secret) -> Any {
    Any {
        type_url: Secret::type_url(),
        value: s.encode_to_vec(),
    }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
        ..Default::default()
    })
}

fn bundle_pem(b: &Bundle) -> Vec<u8> {
    pem::encode_certs(b.x509_authorities.iter().map(Vec::as_slice)).into_bytes()
}

fn tls(name: &str, s: &CachedSvid) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(
                pem::encode_certs(s.chain.iter().map(Vec::as_slice)).into_bytes(),
            ),
            private_key: inline(pem::encode("PRIVATE KEY", &s.key).into_bytes()),
            ..Default::default()
        })),
    }
}

fn trusted_ca(name: &str, b: &Bundle) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem(b)),
                ..Default::default()
            },
        )),
    }
}

fn spiffe_validator(name: &str, bundles: &[&Bundle]) -> Secret {
    let mut tds: Vec<spiffe_cert_validator_config::TrustDomain> = bundles
        .iter()
        .map(|b| spiffe_cert_validator_config::TrustDomain {
            name: b.trust_domain.clone(),
            trust_bundle: inline(bundle_pem(b)),
            ..Default::default()
        })
        .collect();
    tds.sort_by(|a, b| a.name.cmp(&b.name));
    tds.dedup_by(|a, b| a.name == b.name);
    let config = SpiffeCertValidatorConfig {
        trust_domains: tds,
        ..Default::default()
    };
    Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.to_string(),
                    typed_config: Some(Any {
                        type_url: SpiffeCertValidatorConfig::type_url(),
                        value: config.encode_to_vec(),
                    }),
                }),
                ..Default::default()
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn svid(id: &str) -> CachedSvid {
        CachedSvid {
            entry_id: id.into(),
            entry_revision: 1,
            spiffe_id: id.into(),
            chain: vec![vec![1, 2, 3]],
            key: vec![4, 5],
            serial: "01".into(),
            not_after: SystemTime::UNIX_EPOCH,
            renew_at: SystemTime::UNIX_EPOCH,
            authority: "a".into(),
        }
    }

    fn bundle(td: &str) -> Bundle {
        Bundle {
            trust_domain: td.into(),
            x509_authorities: vec![vec![9, 9]],
            ..Default::default()
        }
    }

    fn names(r: &Resolved) -> Vec<(String, &'static str)> {
        r.resources
            .iter()
            .map(|a| {
                assert_eq!(a.type_url, secret_type_url());
                let s = Secret::decode(a.value.as_slice()).expect("secret");
                let kind = match s.r#type {
                    Some(secret::Type::TlsCertificate(_)) => "tls",
                    Some(secret::Type::ValidationContext(v))
                        if v.custom_validator_config.is_some() =>
                    {
                        "spiffe"
                    }
                    Some(secret::Type::ValidationContext(_)) => "ca",
                    _ => "other",
                };
                (s.name, kind)
            })
            .collect()
    }

    #[test]
    fn names_resolve_like_spire_and_unknown_ones_are_left_out() {
        let (web, db) = (
            svid("spiffe://example.org/web"),
            svid("spiffe://example.org/db"),
        );
        let (own, fed) = (bundle("example.org"), bundle("partner.org"));
        let v = CallerView {
            svids: vec![Some(&web), Some(&db)],
            own: Some(&own),
            bundles: vec![&own, &fed],
        };
        let ask = |n: &[&str]| v.resolve(&n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let r = ask(&[
            "default",
            "spiffe://example.org/db",
            "ROOTCA",
            "partner.org",
            "spiffe://example.org",
            "ALL",
            "spiffe://example.org/nope",
            "other.org",
            "default",
        ]);
        assert_eq!(
            names(&r),
            vec![
                ("default".into(), "tls"),
                ("spiffe://example.org/db".into(), "tls"),
                ("ROOTCA".into(), "ca"),
                ("partner.org".into(), "ca"),
                ("spiffe://example.org".into(), "ca"),
                ("ALL".into(), "spiffe"),
            ]
        );
        assert_eq!(r.unknown, vec!["spiffe://example.org/nope", "other.org"]);
        // Everything, for an empty list.
        assert_eq!(names(&ask(&[])).len(), 4);
    }

    #[test]
    fn default_waits_for_the_first_entry() {
        let db = svid("spiffe://example.org/db");
        let v = CallerView {
            svids: vec![None, Some(&db)],
            ..Default::default()
        };
        let r = v.resolve(&[
            "default".to_string(),
            "ROOTCA".to_string(),
            "ALL".to_string(),
        ]);
        assert!(r.resources.is_empty());
        assert_eq!(r.unknown, vec!["default", "ROOTCA", "ALL"]);
    }
}
