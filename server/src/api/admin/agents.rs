//! Agents on the admin API: list, ban and evict, each naming the entries it
//! affects.

use meshid_proto::admin::*;
use tonic::{Request, Response, Status};

use super::*;
use crate::audit::Event;

pub(super) async fn list_agents(
    svc: &AdminService,
    _req: Request<ListAgentsRequest>,
) -> Result<Response<ListAgentsResponse>, Status> {
    let agents = svc.state.store.list_agents().await.map_err(store_status)?;
    Ok(Response::new(ListAgentsResponse {
        agents: agents.iter().map(agent_to_proto).collect(),
    }))
}

pub(super) async fn ban_agent(
    svc: &AdminService,
    req: Request<AgentActionRequest>,
) -> Result<Response<AgentActionResponse>, Status> {
    let planned = crate::safe_ops::is_planned(&req);
    agent_action(svc, req.into_inner(), true, planned).await
}

pub(super) async fn evict_agent(
    svc: &AdminService,
    req: Request<AgentActionRequest>,
) -> Result<Response<AgentActionResponse>, Status> {
    let planned = crate::safe_ops::is_planned(&req);
    agent_action(svc, req.into_inner(), false, planned).await
}

pub(super) async fn agent_action(
    svc: &AdminService,
    r: AgentActionRequest,
    ban: bool,
    planned: bool,
) -> Result<Response<AgentActionResponse>, Status> {
    let st = &svc.state;
    crate::safe_ops::refuse_unplanned(st, planned, r.dry_run)?;
    let mut agent = st
        .store
        .get_agent(&r.spiffe_id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("agent {} does not exist", r.spiffe_id)))?;
    let affected = st
        .store
        .list_entries_by_parents(&agent.parent_ids())
        .await
        .map_err(store_status)?
        .into_iter()
        .map(|e| e.id)
        .collect::<Vec<_>>();
    if !r.dry_run {
        if ban {
            // Sets the flag alone: a renewal racing the ban neither
            // undoes it nor is undone by it.
            agent = st
                .store
                .ban_agent(&agent.spiffe_id)
                .await
                .map_err(store_status)?;
        } else {
            st.store
                .delete_agent(&agent.spiffe_id)
                .await
                .map_err(store_status)?;
        }
        svc.audit(
            Event::new(if ban { "agent_banned" } else { "agent_evicted" })
                .with("agent", agent.spiffe_id.clone())
                .with("affected_entries", affected.clone()),
        )
        .await?;
        // The sync view re-reads the store and sets the gauges.
        st.notify_change();
    }
    Ok(Response::new(AgentActionResponse {
        agent: Some(agent_to_proto(&agent)),
        affected_entry_ids: affected,
        dry_run: r.dry_run,
    }))
}

pub(super) fn agent_to_proto(a: &AgentRecord) -> Agent {
    Agent {
        spiffe_id: a.spiffe_id.clone(),
        attestor: a.attestor.clone(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        aliases: a.aliases.clone(),
        attested_at: a.attested_at,
    }
}
