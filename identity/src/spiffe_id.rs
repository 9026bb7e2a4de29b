//! The one place that decides whether a string is a SPIFFE ID or trust
//! domain meshid accepts, stores, issues or serves.
//!
//! The `spiffe` crate parses leniently: it lowercases an uppercase scheme
//! or trust domain and does not bound the URI's length. meshid *refuses*
//! anything that is not already in canonical form instead of normalising
//! it, so that what an operator typed, what the store holds, what goes into
//! a certificate's URI SAN and what peers compare byte for byte are the same
//! string (SPIFFE-ID §2.1: the scheme and trust domain are lowercase;
//! §2.3: at most 2048 bytes; X509-SVID §2: an SVID names a workload, so it
//! has a path). Callers use [`workload_id`], [`any_id`] and
//! [`trust_domain`] rather than string checks on `"spiffe://"`.

use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// SPIFFE-ID §2.3: implementations need not accept, and must not generate,
/// SPIFFE IDs longer than this many bytes.
pub const MAX_ID_BYTES: usize = 2048;

/// SPIFFE-ID §2.1: a trust domain name is at most 255 bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// Why a string is not a SPIFFE ID or trust domain meshid accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Not a SPIFFE ID at all (scheme, characters, segments).
    #[error("{value:?} is not a valid SPIFFE ID: {reason}")]
    Invalid {
        /// The input as given (cut to 128 bytes).
        value: String,
        /// What the parser objected to.
        reason: String,
    },
    /// The scheme or trust domain has uppercase letters.
    #[error(
        "{value:?} is not in canonical form: the scheme and trust domain must be lowercase \
         (SPIFFE-ID §2.1); write {canonical:?}"
    )]
    NotCanonical {
        /// The input as given (cut to 128 bytes).
        value: String,
        /// The lowercase form the operator probably meant.
        canonical: String,
    },
    /// Longer than [`MAX_ID_BYTES`].
    #[error("SPIFFE ID of {len} bytes is longer than the 2048 bytes SPIFFE-ID §2.3 allows")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A trust domain's ID where a workload's is needed.
    #[error(
        "{value:?} names a trust domain, not a workload: a workload's SPIFFE ID needs a path \
         such as {value}/web (X509-SVID §2)"
    )]
    NoPath {
        /// The input as given.
        value: String,
    },
    /// Not a valid trust domain name.
    #[error("{value:?} is not a valid trust domain name: {reason}")]
    TrustDomain {
        /// The input as given (cut to 128 bytes).
        value: String,
        /// Why.
        reason: String,
    },
}

impl IdError {
    /// A short, fixed label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::NotCanonical { .. } => "not_canonical",
            Self::TooLong { .. } => "too_long",
            Self::NoPath { .. } => "no_path",
            Self::TrustDomain { .. } => "invalid_trust_domain",
        }
    }
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(128);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{}…", &s[..end])
    } else {
        s.to_string()
    }
}

fn reason(e: &SpiffeIdError) -> String {
    match e {
        SpiffeIdError::BadPathSegmentChar => "a path segment holds a character other than \
             letters, digits, '.', '-' and '_' (percent-encoding is not allowed)"
            .into(),
        other => other.to_string(),
    }
}

/// Any SPIFFE ID in canonical form: a trust domain's own ID
/// (`spiffe://example.org`) or a workload's.
pub fn any_id(s: &str) -> Result<SpiffeId, IdError> {
    if s.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong { len: s.len() });
    }
    let id = SpiffeId::new(s).map_err(|e| IdError::Invalid {
        value: cut(s),
        reason: reason(&e),
    })?;
    let canonical = id.to_string();
    if canonical != s {
        return Err(IdError::NotCanonical {
            value: cut(s),
            canonical: cut(&canonical),
        });
    }
    Ok(id)
}

/// A workload's SPIFFE ID: canonical and with a path. What may be stored in
/// an entry and written into an SVID.
pub fn workload_id(s: &str) -> Result<SpiffeId, IdError> {
    let id = any_id(s)?;
    if id.path().is_empty() {
        return Err(IdError::NoPath { value: cut(s) });
    }
    Ok(id)
}

/// A trust domain given as `example.org` or `spiffe://example.org`: it must
/// already be lowercase and have no path. Returns the name.
pub fn trust_domain(s: &str) -> Result<TrustDomain, IdError> {
    let bad = |reason: String| IdError::TrustDomain {
        value: cut(s),
        reason,
    };
    let name = match s.split_once("://") {
        Some(("spiffe", rest)) => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("spiffe") => {
            return Err(IdError::NotCanonical {
                value: cut(s),
                canonical: cut(&format!(
                    "spiffe://{}",
                    s[scheme.len() + 3..].to_lowercase()
                )),
            });
        }
        Some(_) => return Err(bad("the scheme must be spiffe://".into())),
        None => s,
    };
    if name.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if name.contains('/') {
        return Err(bad(
            "a trust domain has no path (give the name, like example.org)".into(),
        ));
    }
    if name.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(bad(format!(
            "{} bytes is longer than the 255 bytes SPIFFE-ID §2.1 allows",
            name.len()
        )));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdError::NotCanonical {
            value: cut(s),
            canonical: cut(&name.to_ascii_lowercase()),
        });
    }
    TrustDomain::new(name).map_err(|e| bad(e.to_string()))
}

/// The scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";

/// The path under which meshid names its own components
/// (`spiffe://<td>/meshid/...`); entries may not use it.
pub const RESERVED_PATH: &str = "/meshid/";

/// A trust domain's own ID, `spiffe://<name>`, for a name already checked
/// by [`trust_domain`] (or a [`TrustDomain`]'s `Display`).
pub fn trust_domain_id(name: impl std::fmt::Display) -> String {
    format!("{SCHEME}{name}")
}

/// The prefix every workload ID in the trust domain starts with,
/// `spiffe://<name>/`.
pub fn trust_domain_prefix(name: impl std::fmt::Display) -> String {
    format!("{SCHEME}{name}/")
}

/// A workload ID in the trust domain from a path (with or without its
/// leading `/`); the result still has to pass [`workload_id`] where the
/// path came from outside.
pub fn id_in(name: impl std::fmt::Display, path: &str) -> String {
    format!("{SCHEME}{name}/{}", path.trim_start_matches('/'))
}

/// The meshid server's own SPIFFE ID in a trust domain
/// (`spiffe://<name>/meshid/server`): the URI SAN of the node API's
/// certificate that agents pin.
pub fn server_id(name: impl std::fmt::Display) -> String {
    format!("{SCHEME}{name}{RESERVED_PATH}server")
}

/// An ID under meshid's reserved path, `<td_id>/meshid/<parts joined by />`,
/// from a trust domain's ID (see [`trust_domain_id`]).
pub fn reserved_id(td_id: &str, parts: &[&str]) -> String {
    format!("{td_id}{RESERVED_PATH}{}", parts.join("/"))
}

/// A node agent's SPIFFE ID: `<td_id>/meshid/agent/<attestor>/<parts…>`,
/// so an agent's ID says how it proved itself.
pub fn agent_id(td_id: &str, attestor: &str, parts: &[&str]) -> String {
    let mut all = Vec::with_capacity(parts.len() + 2);
    all.push("agent");
    all.push(attestor);
    all.extend_from_slice(parts);
    reserved_id(td_id, &all)
}

/// Whether `id` lies in the trust domain `name` (it is the trust domain's
/// own ID or starts with its prefix).
pub fn is_in_trust_domain(id: &str, name: &str) -> bool {
    id.strip_prefix(SCHEME)
        .and_then(|rest| rest.strip_prefix(name))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The trust domain name of a string given as `example.org` or
/// `spiffe://example.org`, without checking it (use [`trust_domain`] to
/// check).
pub fn strip_scheme(s: &str) -> &str {
    s.strip_prefix(SCHEME).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPIFFE-ID §2.1 "The scheme and trust domain name are
    /// case-insensitive, but must be normalized to lowercase" and §2.3
    /// (2048 bytes); §2.2 segment rules; X509-SVID §2 (a workload has a
    /// path). Each bad form is refused with its own reason.
    #[test]
    fn refuses_every_non_canonical_form() {
        let long = format!("spiffe://example.org/{}", "a".repeat(2100));
        let cases: &[(&str, &str)] = &[
            ("SPIFFE://example.org/x", "not_canonical"),
            ("spiffe://Example.ORG/x", "not_canonical"),
            ("spiffe://example.org", "no_path"),
            (&long, "too_long"),
            ("spiffe://example.org/", "invalid"),
            ("spiffe://example.org/a//b", "invalid"),
            ("spiffe://example.org/a/./b", "invalid"),
            ("spiffe://example.org/a/../b", "invalid"),
            ("spiffe://example.org/a%20b", "invalid"),
            ("spiffe://example.org/a b", "invalid"),
            ("spiffe://example.org/é", "invalid"),
            ("spiffe://user@example.org/x", "invalid"),
            ("spiffe://example.org:8080/x", "invalid"),
            ("spiffe://example.org/x?q=1", "invalid"),
            ("spiffe://example.org/x#f", "invalid"),
            ("https://example.org/x", "invalid"),
            ("", "invalid"),
        ];
        for (s, label) in cases {
            let e = workload_id(s).expect_err(s);
            assert_eq!(e.label(), *label, "{s}: {e}");
        }
        let e = workload_id("spiffe://Example.ORG/x").expect_err("upper");
        assert!(e.to_string().contains("spiffe://example.org/x"), "{e}");
        assert_eq!(
            workload_id("spiffe://example.org/Upper/ok-1_2.3")
                .expect("path case is kept")
                .to_string(),
            "spiffe://example.org/Upper/ok-1_2.3"
        );
        assert!(any_id("spiffe://example.org").is_ok());
        let exact = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        assert_eq!(exact.len(), 2048);
        assert!(workload_id(&exact).is_ok());
    }

    /// SPIFFE-ID §2.1: trust domain names are lowercase letters, digits,
    /// dots, dashes and underscores; meshid refuses rather than lowercases.
    #[test]
    fn trust_domain_must_be_canonical() {
        assert_eq!(
            trust_domain("example.org").expect("ok").to_string(),
            "example.org"
        );
        assert_eq!(
            trust_domain("spiffe://example.org")
                .expect("ok")
                .to_string(),
            "example.org"
        );
        for s in [
            "Example.ORG",
            "SPIFFE://example.org",
            "spiffe://Example.org",
            "example.org/path",
            "spiffe://example.org/",
            "",
            "exa mple.org",
            "example.org:443",
            "https://example.org",
        ] {
            assert!(trust_domain(s).is_err(), "{s}");
        }
        let e = trust_domain("Example.ORG").expect_err("upper");
        assert_eq!(e.label(), "not_canonical");
        assert!(e.to_string().contains("\"example.org\""), "{e}");
        assert!(trust_domain(&"a".repeat(256)).is_err());
    }

    /// The derived forms agree with the parsers: each is accepted by the
    /// matching check and lies in its trust domain.
    #[test]
    fn derived_ids_parse_and_belong_to_their_trust_domain() {
        let td = trust_domain("example.org").expect("td");
        assert_eq!(
            any_id(&trust_domain_id(&td)).expect("td id").to_string(),
            "spiffe://example.org"
        );
        let server = server_id(&td);
        assert_eq!(server, "spiffe://example.org/meshid/server");
        assert!(workload_id(&server).is_ok());
        assert!(is_in_trust_domain(&server, "example.org"));
        assert!(is_in_trust_domain("spiffe://example.org", "example.org"));
        assert!(!is_in_trust_domain(
            "spiffe://example.org.evil/x",
            "example.org"
        ));
        assert!(!is_in_trust_domain("spiffe://example.orgx", "example.org"));
        assert_eq!(id_in("example.org", "/web"), "spiffe://example.org/web");
        assert_eq!(id_in("example.org", "web"), "spiffe://example.org/web");
        assert!(trust_domain_prefix("example.org").starts_with(&trust_domain_id("example.org")));
        assert_eq!(strip_scheme("spiffe://example.org"), "example.org");
        assert_eq!(strip_scheme("example.org"), "example.org");
        let td_id = trust_domain_id("example.org");
        assert_eq!(
            agent_id(&td_id, "join_token", &["t1"]),
            "spiffe://example.org/meshid/agent/join_token/t1"
        );
        assert_eq!(
            reserved_id(&td_id, &["k8s", "c1"]),
            "spiffe://example.org/meshid/k8s/c1"
        );
        assert_eq!(server_id("example.org"), reserved_id(&td_id, &["server"]));
    }
}
