//! `meshid server agent ban` while agents renew their SVIDs as fast as they
//! can, through the real binaries: the ban holds every time, and the banned
//! agent gets nothing more (its renewal and signing calls are refused with
//! whatever SVID it ended up holding).

mod common;

use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, key_and_csr, node_channel, wait_for};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{RenewAgentRequest, SignX509SvidsRequest, X509SvidParams};

/// Agents renewing every ~0.4 s (4 s SVIDs renewed at a tenth of their
/// remaining lifetime), each banned at a different moment of its renewal
/// cycle. Each trial is one agent; they run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_holds_against_an_agent_renewing_in_a_loop() {
    const TRIALS: usize = 8;
    let server = Server::start("agent_svid_ttl = \"4s\"\ndefault_svid_ttl = \"1m\"\n");
    let bundle = server.bundle_pem();
    let mut agents = Vec::new();
    for i in 0..TRIALS {
        let alias = format!("spiffe://{TD}/node/race-{i}");
        let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
        let dir = server.dir.path().join(format!("agent-{i}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("bootstrap.pem"), &bundle).expect("bundle");
        let socket = dir.join("api.sock");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\n\
                 data_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmax_backoff = \"1s\"\nrotation_fraction = 0.1\n",
                server.node_addr,
                socket.display(),
                d = dir.display()
            ),
        )
        .expect("config");
        // An entry, so that the agent also has something to sign.
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/w/race-{i}"),
            "--selector",
            "unix:uid:4242",
        ]);
        agents.push(AgentProc::start_config(&dir, config, socket, Some(&token)));
    }
    // Each agent's SPIFFE ID, from the identity it persisted.
    let agent_ids: Vec<String> = agents
        .iter()
        .map(|a| {
            wait_for("agent identity", Duration::from_secs(60), || {
                let pem = std::fs::read(a.dir.join("data/agent_identity.pem")).ok()?;
                let leaf = meshid_identity::pem::parse_certs(&pem)
                    .ok()?
                    .into_iter()
                    .next()?;
                Some(
                    meshid_identity::SvidInfo::from_der(&leaf)
                        .expect("agent SVID")
                        .spiffe_id
                        .to_string(),
                )
            })
        })
        .collect();
    assert_eq!(attested_agents(&server).len(), TRIALS);
    // Every agent is renewing: at least three SVIDs each.
    wait_for("agents renewing", Duration::from_secs(60), || {
        let audit = server.audit();
        agent_ids
            .iter()
            .all(|id| agent_svids(&audit, id) >= 3)
            .then_some(())
    });

    for (i, (id, agent)) in agent_ids.iter().zip(&agents).enumerate() {
        // Spread the bans over the renewal cycle.
        tokio::time::sleep(Duration::from_millis(53 * i as u64)).await;
        server.ok(&["agent", "ban", id]);
        // Whatever SVID the agent holds now is refused for everything.
        let pem = std::fs::read(agent.dir.join("data/agent_identity.pem")).expect("identity");
        let chain = meshid_identity::pem::parse_certs(&pem)
            .expect("chain")
            .into_iter()
            .map(|c| c.to_vec())
            .collect();
        let key = match meshid_identity::pem::parse_key(&pem).expect("key") {
            rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            other => panic!("unexpected key type {other:?}"),
        };
        let mut node =
            NodeClient::new(node_channel(&server.node_addr, &bundle, Some((chain, key))).await);
        let err = node
            .renew_agent(RenewAgentRequest {
                csr: key_and_csr().1,
            })
            .await
            .expect_err("a banned agent cannot renew");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("banned"), "{err:?}");
        let entry = entry_of(&server, &format!("spiffe://{TD}/w/race-"), id);
        let err = node
            .sign_x509_svids(SignX509SvidsRequest {
                params: vec![X509SvidParams {
                    entry_id: entry,
                    csr: key_and_csr().1,
                }],
            })
            .await
            .expect_err("a banned agent cannot sign");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    }
    // Give any renewal that raced a ban time to finish, and the agents time
    // to try again (several renewal periods).
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        for id in &agent_ids {
            assert!(banned(&server, id), "the ban of {id} was undone");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let audit = server.audit();
    let withheld = audit
        .iter()
        .filter(|r| r["event"] == "agent_svid_withheld")
        .count();
    eprintln!(
        "{withheld} agent SVIDs signed by renewals that lost the race to a ban were withheld"
    );
    for (id, agent) in agent_ids.iter().zip(&agents) {
        assert!(banned(&server, id), "the ban of {id} was undone");
        assert!(
            agent.log().contains("banned"),
            "the agent was told it is banned: {}",
            agent.log()
        );
        // Nothing issued to it after its ban was handed out: any SVID signed
        // by a renewal that lost the race is recorded as withheld.
        let ban_seq = audit
            .iter()
            .find(|r| r["event"] == "agent_banned" && r["agent"] == id.as_str())
            .and_then(|r| r["seq"].as_u64())
            .expect("ban audited");
        for r in audit.iter().filter(|r| {
            r["seq"].as_u64() > Some(ban_seq)
                && r["event"] == "x509_svid_issued"
                && r["agent"] == id.as_str()
        }) {
            assert!(
                audit
                    .iter()
                    .any(|w| w["event"] == "agent_svid_withheld" && w["serial"] == r["serial"]),
                "SVID {} issued to {id} after its ban was not withheld",
                r["serial"]
            );
        }
    }
}

fn agents_json(server: &Server) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&server.ok(&["agent", "list", "--output", "json"]))
        .expect("agent list json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn attested_agents(server: &Server) -> Vec<String> {
    agents_json(server)
        .iter()
        .filter_map(|a| a["spiffe_id"].as_str().map(str::to_string))
        .collect()
}

fn banned(server: &Server, id: &str) -> bool {
    agents_json(server)
        .iter()
        .any(|a| a["spiffe_id"] == id && a["banned"] == true)
}

fn agent_svids(audit: &[serde_json::Value], id: &str) -> usize {
    audit
        .iter()
        .filter(|r| r["event"] == "x509_svid_issued" && r["kind"] == "agent" && r["agent"] == id)
        .count()
}

/// The id of the entry parented by the agent's alias (the agent's own
/// entry), found through the audit of the agent's attestation.
fn entry_of(server: &Server, spiffe_prefix: &str, agent_id: &str) -> String {
    let audit = server.audit();
    let aliases: Vec<String> = audit
        .iter()
        .find(|r| r["event"] == "attestation_succeeded" && r["agent"] == agent_id)
        .and_then(|r| r["aliases"].as_array().cloned())
        .expect("attestation audited")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    let entries: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
    entries
        .as_array()
        .expect("array")
        .iter()
        .find(|e| {
            e["spiffe_id"]
                .as_str()
                .is_some_and(|s| s.starts_with(spiffe_prefix))
                && e["parent_id"]
                    .as_str()
                    .is_some_and(|p| aliases.iter().any(|a| a == p))
        })
        .and_then(|e| e["id"].as_str().map(str::to_string))
        .expect("the agent's entry")
}
