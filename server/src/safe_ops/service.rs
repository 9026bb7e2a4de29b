//! Planning, approving and applying changes. The selection of what a change
//! touches is the admin API's own dry run of that operation, and applying
//! runs the same admin API operation, so a planned change is validated,
//! audited and signalled to agents exactly like a direct one.

use std::sync::Arc;

use meshid_proto::admin::admin_server::Admin as _;
use meshid_proto::admin::plan_change_request::Operation;
use meshid_proto::admin::{AgentActionRequest, DeleteEntriesRequest, DeleteFederatedBundleRequest};
use tonic::{Request, Status};

use super::plan::{self, Kind, Plan, Touched};
use super::undo::recycle_rows;
use super::{BlastRadius, audit, now, secs};
use crate::api::admin::AdminService;
use crate::audit::Event;
use crate::state::ServerState;
use crate::store::safe_ops::{ChangeRow, PlanApproval, PlanRow};

/// Safe operations over the shared server state.
#[derive(Debug, Clone)]
pub struct SafeOps {
    pub(super) state: Arc<ServerState>,
}

/// What a planned operation selects, before counting.
struct Selection {
    kind: Kind,
    touched: Vec<Touched>,
    /// Entries deleted, or cut off (ban, evict, bundle delete), by id.
    entry_ids: Vec<String>,
    /// The agent banned or evicted.
    agent_id: Option<String>,
}

fn unsigned(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn refused(m: impl Into<String>) -> Status {
    Status::failed_precondition(m.into())
}

impl SafeOps {
    /// Safe operations over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    fn admin(&self) -> AdminService {
        AdminService::new(self.state.clone())
    }

    async fn select(&self, op: Operation) -> Result<Selection, Status> {
        let admin = self.admin();
        let agent = |r: AgentActionRequest, kind: Kind| async move {
            let agent = self
                .state
                .store
                .get_agent(&r.spiffe_id)
                .await?
                .ok_or_else(|| {
                    Status::not_found(format!("agent {} does not exist", r.spiffe_id))
                })?;
            let r = Request::new(AgentActionRequest { dry_run: true, ..r });
            let resp = if kind == Kind::AgentBan {
                admin.ban_agent(r).await?
            } else {
                admin.evict_agent(r).await?
            }
            .into_inner();
            Ok::<_, Status>(Selection {
                kind,
                touched: vec![plan::touched_agent(&agent)],
                entry_ids: resp.affected_entry_ids,
                agent_id: Some(agent.spiffe_id),
            })
        };
        match op {
            Operation::DeleteEntries(r) => {
                let r = DeleteEntriesRequest { dry_run: true, ..r };
                let entries = self
                    .admin()
                    .delete_entries(Request::new(r))
                    .await?
                    .into_inner()
                    .entries;
                Ok(Selection {
                    kind: Kind::EntryDelete,
                    touched: plan::touched_entries(&entries),
                    entry_ids: entries.into_iter().map(|e| e.id).collect(),
                    agent_id: None,
                })
            }
            Operation::BanAgent(r) => agent(r, Kind::AgentBan).await,
            Operation::EvictAgent(r) => agent(r, Kind::AgentEvict).await,
            Operation::DeleteBundle(r) => {
                let r = DeleteFederatedBundleRequest { dry_run: true, ..r };
                let resp = self
                    .admin()
                    .delete_federated_bundle(Request::new(r))
                    .await?
                    .into_inner();
                let bundle = resp
                    .bundle
                    .ok_or_else(|| Status::internal("dry run returned no bundle"))?;
                Ok(Selection {
                    kind: Kind::BundleDelete,
                    touched: vec![plan::touched_bundle(&bundle)],
                    entry_ids: resp.affected_entry_ids,
                    agent_id: None,
                })
            }
        }
    }

    /// Makes and saves a plan of `op` for `author`. Nothing else changes.
    pub async fn plan(&self, author: &str, op: Operation) -> Result<Plan, Status> {
        let st = &self.state;
        let sel = self.select(op).await?;
        let now = now();
        let entries = st.store.get_entries(&sel.entry_ids).await?;
        let agents = st.store.list_agents().await?;
        let mut affected_agents: Vec<String> = agents
            .iter()
            .filter(|a| {
                let ids = a.parent_ids();
                Some(&a.spiffe_id) == sel.agent_id.as_ref()
                    || entries.iter().any(|e| ids.contains(&e.parent_id))
            })
            .map(|a| a.spiffe_id.clone())
            .collect();
        affected_agents.sort();
        let live_svids = st
            .store
            .count_live_issued(
                &sel.entry_ids,
                &sel.agent_id.iter().cloned().collect::<Vec<_>>(),
                now,
            )
            .await?;
        let blast_radius = BlastRadius {
            entries: unsigned(sel.entry_ids.len()),
            total_entries: u64::try_from(st.store.count_entries().await?).unwrap_or(0),
            agents: u64::from(sel.agent_id.is_some()),
            total_agents: unsigned(agents.len()),
        };
        let over_limit = blast_radius.over_limit(&st.config.safe_ops);
        let (touched, affected_entries) = if sel.kind == Kind::EntryDelete {
            (sel.touched, Vec::new())
        } else {
            (sel.touched, sel.entry_ids)
        };
        let p = Plan {
            id: uuid::Uuid::new_v4().to_string(),
            kind: sel.kind,
            author: author.to_string(),
            created_at: now,
            expires_at: now.saturating_add(secs(st.config.safe_ops.plan_ttl)),
            touched,
            affected_entries,
            affected_agents,
            live_svids,
            blast_radius,
            over_limit,
        };
        st.store
            .insert_plan(&PlanRow {
                id: p.id.clone(),
                kind: p.kind.as_str().into(),
                author: p.author.clone(),
                created_at: p.created_at,
                expires_at: p.expires_at,
                body: p.to_file(),
                applied_change: String::new(),
            })
            .await?;
        audit(
            st,
            vec![
                Event::new("plan_created")
                    .with("plan", p.id.clone())
                    .with("kind", p.kind.as_str())
                    .with("author", p.author.clone())
                    .with("rows", unsigned(p.touched.len()))
                    .with("live_svids", p.live_svids),
            ],
        )
        .await?;
        Ok(p)
    }

    /// The stored plan a plan file names; refuses a file that differs from
    /// it, and an applied or expired plan.
    async fn load(&self, file: &str) -> Result<(Plan, PlanRow), Status> {
        let p = Plan::from_file(file)
            .map_err(|e| Status::invalid_argument(format!("not a plan file: {e}")))?;
        let row = self
            .state
            .store
            .get_plan(&p.id)
            .await?
            .ok_or_else(|| Status::not_found(format!("plan {} does not exist", p.id)))?;
        if row.body.trim() != file.trim() {
            return Err(Status::invalid_argument(format!(
                "the plan file differs from plan {} as the server saved it",
                p.id
            )));
        }
        if !row.applied_change.is_empty() {
            return Err(refused(format!(
                "plan {} was applied already (change {})",
                p.id, row.applied_change
            )));
        }
        if now() > row.expires_at {
            return Err(refused(format!(
                "plan {} expired (plan_ttl); make a new plan",
                p.id
            )));
        }
        Ok((p, row))
    }

    /// Approves a plan as `approver`, who must not be its author. Audited,
    /// refusals too.
    pub async fn approve(&self, approver: &str, file: &str) -> Result<String, Status> {
        let st = &self.state;
        let (p, _) = self.load(file).await?;
        if approver == p.author {
            audit(
                st,
                vec![
                    Event::new("plan_approval_refused")
                        .with("plan", p.id.clone())
                        .with("approver", approver)
                        .with("reason", "the author cannot approve their own plan"),
                ],
            )
            .await?;
            return Err(Status::permission_denied(format!(
                "{approver} made plan {}; it must be approved by another admin identity",
                p.id
            )));
        }
        let added = st
            .store
            .add_plan_approval(&PlanApproval {
                plan_id: p.id.clone(),
                approver: approver.into(),
                approved_at: now(),
            })
            .await?;
        if !added {
            return Err(Status::already_exists(format!(
                "{approver} approved plan {} already",
                p.id
            )));
        }
        audit(
            st,
            vec![
                Event::new("plan_approved")
                    .with("plan", p.id.clone())
                    .with("kind", p.kind.as_str())
                    .with("author", p.author.clone())
                    .with("approver", approver),
            ],
        )
        .await?;
        Ok(p.id)
    }

    /// Fingerprints of the plan's rows as they are now (`None`: gone).
    async fn current(&self, p: &Plan) -> Result<Vec<(String, Option<String>)>, Status> {
        let store = &self.state.store;
        let mut out = Vec::with_capacity(p.touched.len());
        let entry_ids: Vec<String> = p
            .touched
            .iter()
            .filter(|t| t.kind == "entry")
            .map(|t| t.id.clone())
            .collect();
        for e in store.get_entries(&entry_ids).await? {
            out.push((e.id.clone(), Some(plan::entry_fingerprint(&e))));
        }
        for t in &p.touched {
            match t.kind.as_str() {
                "agent" => out.push((
                    t.id.clone(),
                    store
                        .get_agent(&t.id)
                        .await?
                        .map(|a| plan::agent_fingerprint(&a)),
                )),
                "bundle" => out.push((
                    t.id.clone(),
                    store
                        .get_bundle(&t.id)
                        .await?
                        .map(|b| plan::bundle_fingerprint(&b)),
                )),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Applies a plan as `actor`: only if approved (when required), within
    /// the blast-radius limits or confirmed with `yes` (without approvals),
    /// and only if no row it touches changed. Returns the change.
    pub async fn apply(&self, actor: &str, file: &str, yes: bool) -> Result<ChangeRow, Status> {
        let st = &self.state;
        let cfg = &st.config.safe_ops;
        let (p, _) = self.load(file).await?;
        let approvals = st.store.list_plan_approvals(&p.id).await?;
        let approved = approvals.iter().any(|a| a.approver != p.author);
        if cfg.require_approval && !approved {
            return Err(refused(format!(
                "plan {} needs the approval of an admin other than {} (`meshid server approve FILE`)",
                p.id, p.author
            )));
        }
        if let Some(why) = &p.over_limit
            && !cfg.require_approval
            && !yes
        {
            return Err(refused(format!(
                "plan {} is over the blast-radius limit ({why}); review it and apply with --yes",
                p.id
            )));
        }
        let moved = plan::moved(&p, &self.current(&p).await?);
        if !moved.is_empty() {
            audit(
                st,
                vec![
                    Event::new("plan_refused")
                        .with("plan", p.id.clone())
                        .with("actor", actor)
                        .with("moved", moved.clone()),
                ],
            )
            .await?;
            return Err(refused(format!(
                "plan {} refused, the store changed since it was made: {}",
                p.id,
                moved.join("; ")
            )));
        }
        let change_id = uuid::Uuid::new_v4().to_string();
        if !st.store.mark_plan_applied(&p.id, &change_id).await? {
            return Err(refused(format!("plan {} was applied already", p.id)));
        }
        let now = now();
        let undoable = matches!(
            p.kind,
            Kind::EntryDelete | Kind::AgentEvict | Kind::BundleDelete
        );
        let undo_until = if undoable {
            now.saturating_add(secs(cfg.undo_window))
        } else {
            0
        };
        let recycled = recycle_rows(st, &p, &change_id, undo_until).await?;
        let change = ChangeRow {
            id: change_id.clone(),
            kind: p.kind.as_str().into(),
            actor: actor.into(),
            created_at: now,
            counts: serde_json::json!({
                "entries": if p.kind == Kind::EntryDelete { p.touched.len() } else { p.affected_entries.len() },
                "agents": p.blast_radius.agents,
                "live_svids": p.live_svids,
                "plan": p.id,
            })
            .to_string(),
            undo_until,
            undone_at: 0,
        };
        st.store.record_change(&change, &recycled).await?;
        if let Err(e) = self.execute(&p).await {
            // Nothing to undo: the change did not happen.
            let _ = st.store.mark_change_undone(&change_id, now).await;
            return Err(e);
        }
        // What older changes removed is kept no longer than their undo window.
        if let Err(e) = st.store.purge_recycled(now).await {
            tracing::warn!(error = %e, "purging the recycle area failed; retried at the next apply");
        }
        audit(
            st,
            vec![
                Event::new("plan_applied")
                    .with("plan", p.id.clone())
                    .with("change", change_id)
                    .with("kind", p.kind.as_str())
                    .with("actor", actor)
                    .with("author", p.author.clone())
                    .with(
                        "approvers",
                        approvals
                            .into_iter()
                            .map(|a| a.approver)
                            .collect::<Vec<_>>(),
                    ),
            ],
        )
        .await?;
        Ok(change)
    }

    /// Runs the planned operation through the admin API (audited, agents
    /// signalled).
    async fn execute(&self, p: &Plan) -> Result<(), Status> {
        let admin = self.admin();
        let first = p.touched.first().map(|t| t.id.clone()).unwrap_or_default();
        match p.kind {
            Kind::EntryDelete => {
                if p.touched.is_empty() {
                    return Ok(());
                }
                let ids = p.touched.iter().map(|t| t.id.clone()).collect();
                admin
                    .delete_entries(super::planned(DeleteEntriesRequest {
                        ids,
                        ..DeleteEntriesRequest::default()
                    }))
                    .await?;
            }
            Kind::AgentBan | Kind::AgentEvict => {
                let r = super::planned(AgentActionRequest {
                    spiffe_id: first,
                    dry_run: false,
                });
                if p.kind == Kind::AgentBan {
                    admin.ban_agent(r).await?;
                } else {
                    admin.evict_agent(r).await?;
                }
            }
            Kind::BundleDelete => {
                admin
                    .delete_federated_bundle(super::planned(DeleteFederatedBundleRequest {
                        trust_domain: first,
                        dry_run: false,
                    }))
                    .await?;
            }
        }
        Ok(())
    }
}

impl SafeOps {
    /// The newest changes, newest first.
    pub async fn list_changes(&self, limit: i64) -> Result<Vec<ChangeRow>, Status> {
        Ok(self.state.store.list_changes(limit).await?)
    }
}
