//! A plan: exactly what one destructive change would do, and the
//! fingerprint of every row it touches, so that applying it later can tell
//! whether anything moved meanwhile.

use meshid_proto::types::{Bundle, Entry};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::BlastRadius;
use crate::store::AgentRecord;

/// What a plan changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `meshid server entry delete`.
    EntryDelete,
    /// `meshid server agent ban`.
    AgentBan,
    /// `meshid server agent evict`.
    AgentEvict,
    /// `meshid server bundle delete`.
    BundleDelete,
}

impl Kind {
    /// The name stored and shown (`entry_delete`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EntryDelete => "entry_delete",
            Self::AgentBan => "agent_ban",
            Self::AgentEvict => "agent_evict",
            Self::BundleDelete => "bundle_delete",
        }
    }
}

/// One row a plan touches, with its fingerprint at planning time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Touched {
    /// `entry`, `agent` or `bundle`.
    pub kind: String,
    /// Entry id, agent SPIFFE ID or trust domain.
    pub id: String,
    /// The entry's SPIFFE ID, or the agent's; empty for a bundle.
    pub spiffe_id: String,
    /// Hex SHA-256 of the row's content (see [`entry_fingerprint`] and friends).
    pub fingerprint: String,
}

/// A saved plan. Its JSON is the plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Plan id.
    pub id: String,
    /// What it changes.
    pub kind: Kind,
    /// Admin identity that made it (`uid:<n>`).
    pub author: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; it cannot be applied after.
    pub expires_at: i64,
    /// Rows the change deletes, bans or evicts, with their fingerprints.
    pub touched: Vec<Touched>,
    /// Entries that lose their SVIDs' renewal or their federated bundle
    /// (ban, evict, bundle delete), by id.
    pub affected_entries: Vec<String>,
    /// Agents that hold SVIDs of the touched or affected entries.
    pub affected_agents: Vec<String>,
    /// Live SVIDs (issuance journal) of the touched or affected entries and
    /// agents at planning time.
    pub live_svids: i64,
    /// How much of the registry it touches.
    pub blast_radius: BlastRadius,
    /// Why it is over the blast-radius limits, if it is.
    pub over_limit: Option<String>,
}

impl Plan {
    /// The plan as its file holds it (pretty JSON, ends with a newline).
    pub fn to_file(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// A plan file's content.
    pub fn from_file(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Human-readable lines: what it changes and what that affects.
    pub fn summary(&self) -> Vec<String> {
        let verb = match self.kind {
            Kind::EntryDelete => "delete",
            Kind::AgentBan => "ban",
            Kind::AgentEvict => "evict",
            Kind::BundleDelete => "delete federated bundle",
        };
        let mut out = vec![format!(
            "plan {} ({}): {verb} {} row{}",
            self.id,
            self.kind.as_str(),
            self.touched.len(),
            if self.touched.len() == 1 { "" } else { "s" }
        )];
        for t in &self.touched {
            out.push(format!("  {} {}  {}", t.kind, t.id, t.spiffe_id));
        }
        if !self.affected_entries.is_empty() {
            out.push(format!(
                "affected entries ({}): {}",
                self.affected_entries.len(),
                self.affected_entries.join(", ")
            ));
        }
        out.push(format!(
            "affected agents ({}): {}",
            self.affected_agents.len(),
            self.affected_agents.join(", ")
        ));
        out.push(format!("live SVIDs affected: {}", self.live_svids));
        if let Some(why) = &self.over_limit {
            out.push(format!("over the blast-radius limit: {why}"));
        }
        out
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An entry's fingerprint: its whole stored content (revision included).
pub fn entry_fingerprint(e: &Entry) -> String {
    hex_sha256(&e.encode_to_vec())
}

/// A bundle's fingerprint: its whole stored content.
pub fn bundle_fingerprint(b: &Bundle) -> String {
    hex_sha256(&b.encode_to_vec())
}

/// An agent's fingerprint: what identifies it and what an operator decides
/// on (attestor, attestation time, aliases, ban); not the serial and expiry
/// of its SVID, which change at every routine renewal.
pub fn agent_fingerprint(a: &AgentRecord) -> String {
    let v = serde_json::json!([a.spiffe_id, a.attestor, a.attested_at, a.aliases, a.banned]);
    hex_sha256(v.to_string().as_bytes())
}

/// Touched rows of an entry deletion.
pub fn touched_entries(entries: &[Entry]) -> Vec<Touched> {
    entries
        .iter()
        .map(|e| Touched {
            kind: "entry".into(),
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            fingerprint: entry_fingerprint(e),
        })
        .collect()
}

/// The touched row of an agent ban or eviction.
pub fn touched_agent(a: &AgentRecord) -> Touched {
    Touched {
        kind: "agent".into(),
        id: a.spiffe_id.clone(),
        spiffe_id: a.spiffe_id.clone(),
        fingerprint: agent_fingerprint(a),
    }
}

/// The touched row of a bundle deletion.
pub fn touched_bundle(b: &Bundle) -> Touched {
    Touched {
        kind: "bundle".into(),
        id: b.trust_domain.clone(),
        spiffe_id: String::new(),
        fingerprint: bundle_fingerprint(b),
    }
}

/// What moved: for each touched row, its fingerprint now (`None`: the row
/// is gone) compared with the plan's. Returns one line per row that moved.
pub fn moved(plan: &Plan, now: &[(String, Option<String>)]) -> Vec<String> {
    plan.touched
        .iter()
        .filter_map(|t| {
            let current = now
                .iter()
                .find(|(id, _)| id == &t.id)
                .and_then(|(_, f)| f.as_ref());
            match current {
                None => Some(format!("{} {} no longer exists", t.kind, t.id)),
                Some(f) if f != &t.fingerprint => Some(format!(
                    "{} {} changed since the plan was made",
                    t.kind, t.id
                )),
                Some(_) => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, rev: i64) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://td/{id}"),
            revision: rev,
            ..Entry::default()
        }
    }

    fn plan(entries: &[Entry]) -> Plan {
        Plan {
            id: "p".into(),
            kind: Kind::EntryDelete,
            author: "uid:0".into(),
            created_at: 1,
            expires_at: 2,
            touched: touched_entries(entries),
            affected_entries: vec![],
            affected_agents: vec![],
            live_svids: 0,
            blast_radius: BlastRadius {
                entries: 1,
                total_entries: 1,
                agents: 0,
                total_agents: 0,
            },
            over_limit: None,
        }
    }

    #[test]
    fn moved_names_changed_and_missing_rows() {
        let p = plan(&[entry("a", 1), entry("b", 1)]);
        let same = vec![
            ("a".to_string(), Some(entry_fingerprint(&entry("a", 1)))),
            ("b".to_string(), Some(entry_fingerprint(&entry("b", 1)))),
        ];
        assert!(moved(&p, &same).is_empty());
        let now = vec![("a".to_string(), Some(entry_fingerprint(&entry("a", 2))))];
        let m = moved(&p, &now);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("entry a changed"), "{m:?}");
        assert!(m[1].contains("entry b no longer exists"), "{m:?}");
    }

    #[test]
    fn plan_file_round_trips() {
        let p = plan(&[entry("a", 1)]);
        assert_eq!(Plan::from_file(&p.to_file()).expect("parse"), p);
    }

    #[test]
    fn agent_fingerprint_ignores_renewal() {
        let mut a = AgentRecord {
            spiffe_id: "spiffe://td/agent".into(),
            attestor: "join_token".into(),
            serial: "01".into(),
            prev_serial: String::new(),
            expires_at: 10,
            banned: false,
            aliases: vec![],
            attested_at: 1,
        };
        let before = agent_fingerprint(&a);
        a.serial = "02".into();
        a.expires_at = 20;
        assert_eq!(agent_fingerprint(&a), before);
        a.banned = true;
        assert_ne!(agent_fingerprint(&a), before);
    }
}
