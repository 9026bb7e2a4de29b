//! SPIFFE IDs as meshid reads them: the ID itself (entries, allow rules,
//! certificates), the sidecar's allow rules, and the URI SAN of a peer's
//! certificate.
#![no_main]

use meshid_identity::svid::{SvidInfo, parse_spiffe_id};
use meshid_sidecar::authz::{Policy, Rule};
use spiffe::{SpiffeId, TrustDomain};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A peer certificate: parsing never panics, and an accepted one has a
    // SPIFFE ID that parses again to itself.
    if let Ok(info) = SvidInfo::from_der(data) {
        let s = info.spiffe_id.to_string();
        assert_eq!(parse_spiffe_id(&s).ok().as_ref(), Some(&info.spiffe_id));
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = parse_spiffe_id(text) {
        // What was accepted is printed back unchanged and parses again.
        assert_eq!(id.to_string(), text);
        assert_eq!(SpiffeId::new(&id.to_string()).ok().as_ref(), Some(&id));
        assert!(TrustDomain::new(id.trust_domain().as_str()).is_ok());
        // An exact rule and a trust-domain rule admit the ID; a prefix rule
        // built from the ID's own path never does (segment boundary).
        let exact = Rule::parse(text).expect("a valid ID is a valid rule");
        assert!(exact.matches(&id));
        let td = Rule::parse(&format!("spiffe://{}", id.trust_domain().as_str()))
            .expect("trust domain rule");
        assert!(td.matches(&id));
        if !id.path().is_empty() {
            let prefix = Rule::parse(&format!("{text}/*")).expect("prefix rule");
            assert!(!prefix.matches(&id));
        }
    }
    // Allow lists: one rule per line; a parsed rule prints back to a rule
    // that parses to itself.
    let lines: Vec<&str> = text.lines().collect();
    if let Ok(policy) = Policy::parse(&lines) {
        for r in policy.rules() {
            assert_eq!(Rule::parse(&r.to_string()).as_ref(), Ok(r));
        }
        if let Some(first) = lines.first()
            && let Ok(id) = SpiffeId::new(first)
        {
            let _ = policy.allows(&id);
        }
    }
});
