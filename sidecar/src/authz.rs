//! SPIFFE ID policy for inbound connections.
//!
//! A policy is a list of rules; a peer is allowed when any rule matches:
//!
//! - `spiffe://td/path` — exactly this SPIFFE ID;
//! - `spiffe://td` — any SPIFFE ID in trust domain `td`;
//! - `spiffe://td/prefix/*` — any ID in `td` whose path starts with the
//!   segments `/prefix/` (segment boundaries: `spiffe://td/a/*` matches
//!   `spiffe://td/a/b` but neither `spiffe://td/ab` nor `spiffe://td/a`).

use std::fmt;

use meshid_identity::svid::parse_spiffe_id;
use meshid_identity::{SpiffeId, TrustDomain};

/// Why a policy rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The rule is not a SPIFFE ID, trust domain or prefix pattern.
    #[error("invalid allow rule {rule:?}: {reason}")]
    Invalid {
        /// The rule as written.
        rule: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The policy has no rules (it would refuse everyone).
    #[error("allow list is empty: it would refuse every peer")]
    Empty,
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in this trust domain.
    TrustDomain(TrustDomain),
    /// Any ID in `trust_domain` whose path starts with `prefix` followed by
    /// `/`. `prefix` starts with `/` and does not end with `/`.
    Prefix {
        /// The trust domain.
        trust_domain: TrustDomain,
        /// The path prefix, e.g. `/ns/prod`.
        prefix: String,
    },
}

impl Rule {
    /// Parses one rule.
    pub fn parse(rule: &str) -> Result<Self, PolicyError> {
        let invalid = |reason: String| PolicyError::Invalid {
            rule: rule.to_string(),
            reason,
        };
        if let Some(base) = rule.strip_suffix("/*") {
            // Validate the prefix as a SPIFFE ID with a path.
            let id = parse_spiffe_id(base).map_err(invalid)?;
            if id.path().is_empty() {
                return Err(invalid(
                    "prefix pattern needs a path; use `spiffe://td` for a whole trust domain"
                        .into(),
                ));
            }
            return Ok(Self::Prefix {
                trust_domain: id.trust_domain().clone(),
                prefix: id.path().to_string(),
            });
        }
        if rule.contains('*') {
            return Err(invalid(
                "`*` is only allowed as a final `/*` path segment".into(),
            ));
        }
        let id = parse_spiffe_id(rule).map_err(invalid)?;
        if id.path().is_empty() {
            Ok(Self::TrustDomain(id.trust_domain().clone()))
        } else {
            Ok(Self::Exact(id))
        }
    }

    /// Whether `id` matches this rule.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::TrustDomain(td) => id.trust_domain() == td,
            Self::Prefix {
                trust_domain,
                prefix,
            } => {
                id.trust_domain() == trust_domain
                    && id
                        .path()
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/'))
            }
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::TrustDomain(td) => f.write_str(&td.id_string()),
            Self::Prefix {
                trust_domain,
                prefix,
            } => write!(f, "{}{prefix}/*", trust_domain.id_string()),
        }
    }
}

/// A non-empty list of rules; allows a peer that any rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Parses every rule; an empty list is an error.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, PolicyError> {
        if rules.is_empty() {
            return Err(PolicyError::Empty);
        }
        let rules = rules
            .iter()
            .map(|r| Rule::parse(r.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { rules })
    }

    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.rules.iter().any(|r| r.matches(id))
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// This policy as a verifier [`meshid_identity::Authorizer`].
    pub fn authorizer(&self) -> meshid_identity::Authorizer {
        let p = self.clone();
        meshid_identity::Authorizer::Func(std::sync::Arc::new(move |id| p.allows(id)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn policy(rules: &[&str]) -> Policy {
        Policy::parse(rules).unwrap()
    }

    #[test]
    fn exact_matches_only_itself() {
        let p = policy(&["spiffe://example.org/web"]);
        assert!(p.allows(&id("spiffe://example.org/web")));
        assert!(!p.allows(&id("spiffe://example.org/web2")));
        assert!(!p.allows(&id("spiffe://example.org/web/x")));
        assert!(!p.allows(&id("spiffe://other.org/web")));
        assert!(!p.allows(&id("spiffe://example.org/we")));
    }

    #[test]
    fn trust_domain_matches_every_id_in_it() {
        let p = policy(&["spiffe://example.org"]);
        assert!(p.allows(&id("spiffe://example.org/a")));
        assert!(p.allows(&id("spiffe://example.org/a/b/c")));
        assert!(!p.allows(&id("spiffe://example.org.evil/a")));
        assert!(!p.allows(&id("spiffe://evil.example.org/a")));
        assert!(matches!(p.rules()[0], Rule::TrustDomain(_)));
    }

    #[test]
    fn prefix_respects_segment_boundaries() {
        let p = policy(&["spiffe://td/a/*"]);
        assert!(p.allows(&id("spiffe://td/a/b")));
        assert!(p.allows(&id("spiffe://td/a/b/c")));
        assert!(!p.allows(&id("spiffe://td/ab")));
        assert!(!p.allows(&id("spiffe://td/a")));
        assert!(!p.allows(&id("spiffe://other/a/b")));
        assert!(!p.allows(&id("spiffe://td/b/a/c")));
    }

    #[test]
    fn multi_segment_prefix() {
        let p = policy(&["spiffe://td/ns/prod/*"]);
        assert!(p.allows(&id("spiffe://td/ns/prod/sa/web")));
        assert!(!p.allows(&id("spiffe://td/ns/production/sa/web")));
        assert!(!p.allows(&id("spiffe://td/ns/prod")));
    }

    #[test]
    fn any_rule_suffices() {
        let p = policy(&["spiffe://td/a", "spiffe://td/b/*", "spiffe://fed.org"]);
        assert!(p.allows(&id("spiffe://td/a")));
        assert!(p.allows(&id("spiffe://td/b/x")));
        assert!(p.allows(&id("spiffe://fed.org/anything")));
        assert!(!p.allows(&id("spiffe://td/c")));
    }

    #[test]
    fn rejects_bad_rules() {
        for bad in [
            "",
            "td/a",
            "https://td/a",
            "spiffe://td/*",
            "spiffe://td/a*",
            "spiffe://td/*/b",
            "spiffe://td/a/",
            "spiffe://td/a/../b",
            "spiffe://td/a b",
            "spiffe://td/a/**",
            "spiffe:///a",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(Policy::parse::<&str>(&[]), Err(PolicyError::Empty));
    }

    #[test]
    fn non_canonical_rules_are_refused() {
        // SPIFFE-ID §2.1: the scheme and trust domain are lower case. A rule
        // written otherwise is refused with the form to use, not silently
        // lowercased (one identity, one spelling).
        let e = Policy::parse(&["spiffe://Example.ORG/a/*"]).unwrap_err();
        assert!(e.to_string().contains("spiffe://example.org"), "{e}");
        assert!(policy(&["spiffe://example.org/a/*"]).allows(&id("spiffe://example.org/a/b")));
    }

    #[test]
    fn display_round_trips() {
        for r in ["spiffe://td/a", "spiffe://td", "spiffe://td/a/b/*"] {
            assert_eq!(Rule::parse(r).unwrap().to_string(), r);
        }
    }

    #[test]
    fn authorizer_uses_policy() {
        let a = policy(&["spiffe://td/a/*"]).authorizer();
        assert!(a.allows(&id("spiffe://td/a/b")));
        assert!(!a.allows(&id("spiffe://td/ab")));
    }
}
