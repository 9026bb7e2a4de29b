//! `meshid server audit show`: who issued what, when. Reads the log's files
//! and prints the records that match every filter given. It does not check
//! the chain; `audit verify` does.

use std::path::PathBuf;
use std::time::SystemTime;

use serde_json::Value;

use super::record::LineReader;

/// Filters, all ANDed; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    /// Records naming this SPIFFE ID (issued, agent, entry, alias, trust domain).
    pub spiffe_id: Option<String>,
    /// Records by this actor (see [`actor`]); a trailing `*` matches a prefix.
    pub actor: Option<String>,
    /// Records of this event name; a trailing `*` matches a prefix.
    pub action: Option<String>,
}

/// Events an operator causes through the admin API.
const ADMIN_EVENTS: &[&str] = &[
    "join_token_created",
    "entry_created",
    "entry_updated",
    "entry_deleted",
    "federated_bundle_set",
    "federated_bundle_deleted",
    "agent_banned",
    "agent_evicted",
];

/// Who caused a record: its `actor` member if it has one; `admin` for admin
/// API changes; the agent's SPIFFE ID for what an agent asked for (SVIDs
/// issued or refused, its own attestation); `server` for the rest (CA,
/// bundle publication, the server's own SVID, the audit log itself).
pub fn actor(rec: &Value) -> String {
    if let Some(a) = rec.get("actor").and_then(Value::as_str) {
        return a.to_string();
    }
    let event = rec.get("event").and_then(Value::as_str).unwrap_or("");
    if ADMIN_EVENTS.contains(&event) {
        return "admin".into();
    }
    let kind = rec.get("kind").and_then(Value::as_str).unwrap_or("");
    if event.starts_with("attestation_failed") {
        return "unauthenticated".into();
    }
    if kind != "server"
        && let Some(agent) = rec.get("agent").and_then(Value::as_str)
    {
        return agent.to_string();
    }
    "server".into()
}

fn pattern(p: &str, s: &str) -> bool {
    match p.strip_suffix('*') {
        Some(prefix) => s.starts_with(prefix),
        None => p == s,
    }
}

fn names_id(rec: &Value, id: &str) -> bool {
    let direct = ["spiffe_id", "agent", "alias", "trust_domain"]
        .iter()
        .any(|k| rec.get(*k).and_then(Value::as_str) == Some(id));
    let nested = ["entry", "before", "after"].iter().any(|k| {
        rec.get(*k).is_some_and(|e| {
            ["spiffe_id", "parent_id"]
                .iter()
                .any(|f| e.get(*f).and_then(Value::as_str) == Some(id))
        })
    });
    let aliases = rec
        .get("aliases")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(id)));
    direct || nested || aliases
}

impl Filter {
    /// Whether a record matches.
    pub fn matches(&self, rec: &Value) -> bool {
        if let Some(since) = self.since {
            let ts = rec
                .get("ts")
                .and_then(Value::as_str)
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            if ts.is_none_or(|t| t < since) {
                return false;
            }
        }
        if let Some(a) = &self.action {
            let ev = rec.get("event").and_then(Value::as_str).unwrap_or("");
            if !pattern(a, ev) {
                return false;
            }
        }
        if let Some(a) = &self.actor
            && !pattern(a, &actor(rec))
        {
            return false;
        }
        if let Some(id) = &self.spiffe_id
            && !names_id(rec, id)
        {
            return false;
        }
        true
    }
}

/// One matching record.
#[derive(Debug, Clone)]
pub struct Shown {
    /// The line as stored.
    pub raw: String,
    /// Parsed.
    pub value: Value,
}

/// Reads `files` in order and returns the matching records, plus warnings
/// for lines that are not JSON (which `audit verify` would report).
pub fn show(files: &[PathBuf], filter: &Filter) -> std::io::Result<(Vec<Shown>, Vec<String>)> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for path in files {
        let f = std::fs::File::open(path)?;
        let mut r = LineReader::new(std::io::BufReader::new(f));
        let mut n = 0u64;
        while let Some(line) = r.next_line()? {
            n += 1;
            let parsed = std::str::from_utf8(&line.bytes)
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(s).ok().map(|v| (s, v)));
            match parsed {
                Some((s, v)) if v.is_object() => {
                    if filter.matches(&v) {
                        out.push(Shown {
                            raw: s.to_string(),
                            value: v,
                        });
                    }
                }
                _ => warnings.push(format!(
                    "{}:{n}: not a JSON record; skipped (run `meshid server audit verify`)",
                    path.display()
                )),
            }
        }
    }
    Ok((out, warnings))
}

/// One line of text output: time, event, actor, then the other members.
pub fn text_line(rec: &Value) -> String {
    let get = |k: &str| rec.get(k).and_then(Value::as_str).unwrap_or("-");
    let mut s = format!("{}  {:<26} {}", get("ts"), get("event"), actor(rec));
    if let Some(obj) = rec.as_object() {
        for (k, v) in obj {
            if matches!(k.as_str(), "ts" | "event" | "seq" | "prev" | "actor") {
                continue;
            }
            let v = match v {
                Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            s.push_str(&format!("  {k}={v}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters() {
        let issued = json!({"ts":"2026-01-02T00:00:00Z","event":"x509_svid_issued","spiffe_id":"spiffe://td/web","agent":"spiffe://td/meshid/agent/x"});
        let created = json!({"ts":"2026-01-01T00:00:00Z","event":"entry_created","entry":{"spiffe_id":"spiffe://td/web","parent_id":"spiffe://td/node"}});
        let server = json!({"ts":"2026-01-01T00:00:00Z","event":"x509_svid_issued","kind":"server","spiffe_id":"spiffe://td/meshid/server","agent":"spiffe://td/meshid/server"});
        assert_eq!(actor(&issued), "spiffe://td/meshid/agent/x");
        assert_eq!(actor(&created), "admin");
        assert_eq!(actor(&server), "server");
        let f = Filter {
            spiffe_id: Some("spiffe://td/web".into()),
            ..Filter::default()
        };
        assert!(f.matches(&issued) && f.matches(&created) && !f.matches(&server));
        let f = Filter {
            action: Some("entry_*".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&issued) && f.matches(&created));
        let f = Filter {
            since: humantime::parse_rfc3339("2026-01-01T12:00:00Z").ok(),
            actor: Some("spiffe://td/meshid/agent/*".into()),
            ..Filter::default()
        };
        assert!(f.matches(&issued) && !f.matches(&created));
        assert!(text_line(&issued).contains("spiffe_id=spiffe://td/web"));
    }
}
