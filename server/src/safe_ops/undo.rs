//! The recycle area and undo: what a change deletes or evicts is kept with
//! the change until its undo window ends; `undo` puts it back exactly (same
//! ids, selectors, TTLs, parents; the agent row as it was), and the store's
//! change signal sends restored entries to agents on their sync streams.

use meshid_proto::types::{Bundle, Entry};
use prost::Message as _;
use tonic::Status;

use super::plan::{Kind, Plan};
use super::{SafeOps, audit, now};
use crate::audit::Event;
use crate::state::ServerState;
use crate::store::AgentRecord;
use crate::store::safe_ops::RecycleRow;

/// What an undo restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Entry ids.
    pub entries: Vec<String>,
    /// Agent SPIFFE IDs.
    pub agents: Vec<String>,
    /// Trust domains of federated bundles.
    pub bundles: Vec<String>,
}

fn agent_to_json(a: &AgentRecord) -> Vec<u8> {
    serde_json::json!({
        "spiffe_id": a.spiffe_id, "attestor": a.attestor, "serial": a.serial,
        "prev_serial": a.prev_serial, "expires_at": a.expires_at, "banned": a.banned,
        "aliases": a.aliases, "attested_at": a.attested_at,
    })
    .to_string()
    .into_bytes()
}

fn agent_from_json(data: &[u8]) -> Result<AgentRecord, Status> {
    let corrupt = |m: String| Status::internal(format!("recycled agent row: {m}"));
    let v: serde_json::Value = serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))?;
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| corrupt(k.into()))
    };
    let i = |k: &str| v[k].as_i64().ok_or_else(|| corrupt(k.into()));
    Ok(AgentRecord {
        spiffe_id: s("spiffe_id")?,
        attestor: s("attestor")?,
        serial: s("serial")?,
        prev_serial: s("prev_serial")?,
        expires_at: i("expires_at")?,
        banned: v["banned"].as_bool().unwrap_or(false),
        aliases: serde_json::from_value(v["aliases"].clone())
            .map_err(|e| corrupt(e.to_string()))?,
        attested_at: i("attested_at")?,
    })
}

/// The rows a planned change removes, as they are now, for the recycle area.
pub(super) async fn recycle_rows(
    st: &ServerState,
    p: &Plan,
    change_id: &str,
    expires_at: i64,
) -> Result<Vec<RecycleRow>, Status> {
    let row = |item_kind: &str, item_id: String, data: Vec<u8>| RecycleRow {
        change_id: change_id.into(),
        item_kind: item_kind.into(),
        item_id,
        data,
        expires_at,
    };
    let ids: Vec<String> = p.touched.iter().map(|t| t.id.clone()).collect();
    let mut out = Vec::new();
    match p.kind {
        Kind::EntryDelete => {
            for e in st.store.get_entries(&ids).await? {
                out.push(row("entry", e.id.clone(), e.encode_to_vec()));
            }
        }
        Kind::AgentEvict => {
            for id in ids {
                if let Some(a) = st.store.get_agent(&id).await? {
                    out.push(row("agent", id, agent_to_json(&a)));
                }
            }
        }
        Kind::BundleDelete => {
            for id in ids {
                if let Some(b) = st.store.get_bundle(&id).await? {
                    out.push(row("bundle", id, b.encode_to_vec()));
                }
            }
        }
        Kind::AgentBan => {}
    }
    Ok(out)
}

impl SafeOps {
    /// Restores what change `id` removed, as `actor`: refused once undone,
    /// after its undo window, and when a row it would restore exists again.
    pub async fn undo(&self, actor: &str, id: &str) -> Result<Restored, Status> {
        let st = &self.state;
        let change = st
            .store
            .get_change(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("change {id} does not exist")))?;
        if change.undone_at != 0 {
            return Err(Status::failed_precondition(format!(
                "change {id} was undone already"
            )));
        }
        if change.undo_until == 0 {
            return Err(Status::failed_precondition(format!(
                "a change of kind {} cannot be undone",
                change.kind
            )));
        }
        let now = now();
        if now > change.undo_until {
            return Err(Status::failed_precondition(format!(
                "the undo window of change {id} has ended"
            )));
        }
        let rows = st.store.list_recycled(id).await?;
        let mut entries = Vec::new();
        let mut agents = Vec::new();
        let mut bundles = Vec::new();
        for r in &rows {
            let corrupt = |e: prost::DecodeError| Status::internal(format!("recycled row: {e}"));
            match r.item_kind.as_str() {
                "entry" => entries.push(Entry::decode(r.data.as_slice()).map_err(corrupt)?),
                "agent" => agents.push(agent_from_json(&r.data)?),
                "bundle" => bundles.push(Bundle::decode(r.data.as_slice()).map_err(corrupt)?),
                other => return Err(Status::internal(format!("recycled row of kind {other}"))),
            }
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        if let Some(e) = st.store.get_entries(&ids).await?.first() {
            return Err(Status::failed_precondition(format!(
                "entry {} exists again; nothing restored",
                e.id
            )));
        }
        for a in &agents {
            if st.store.get_agent(&a.spiffe_id).await?.is_some() {
                return Err(Status::failed_precondition(format!(
                    "agent {} has attested again; nothing restored",
                    a.spiffe_id
                )));
            }
        }
        for b in &bundles {
            if st.store.get_bundle(&b.trust_domain).await?.is_some() {
                return Err(Status::failed_precondition(format!(
                    "a bundle for {} was set again; nothing restored",
                    b.trust_domain
                )));
            }
        }
        if !st.store.mark_change_undone(id, now).await? {
            return Err(Status::failed_precondition(format!(
                "change {id} was undone already"
            )));
        }
        entries.sort_by_key(|e| e.created_at);
        for e in &entries {
            st.store.create_entry(e).await?;
        }
        for a in &agents {
            st.store.attest_agent(a).await?;
            if a.banned {
                st.store.ban_agent(&a.spiffe_id).await?;
            }
        }
        for b in &bundles {
            st.store.put_bundle(b, true).await?;
        }
        let restored = Restored {
            entries: ids,
            agents: agents.into_iter().map(|a| a.spiffe_id).collect(),
            bundles: bundles.into_iter().map(|b| b.trust_domain).collect(),
        };
        audit(
            st,
            vec![
                Event::new("change_undone")
                    .with("change", id)
                    .with("kind", change.kind)
                    .with("actor", actor)
                    .with("entries", restored.entries.clone())
                    .with("agents", restored.agents.clone())
                    .with("bundles", restored.bundles.clone()),
            ],
        )
        .await?;
        // The sync view re-reads the store and sets the gauges.
        st.notify_change();
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_rows_round_trip() {
        let a = AgentRecord {
            spiffe_id: "spiffe://td/agent".into(),
            attestor: "join_token".into(),
            serial: "0a".into(),
            prev_serial: "09".into(),
            expires_at: 5,
            banned: true,
            aliases: vec!["spiffe://td/node/a".into()],
            attested_at: 3,
        };
        assert_eq!(agent_from_json(&agent_to_json(&a)).expect("decode"), a);
    }
}
