//! Signing throughput over the node API: a real `meshid server run` (release
//! build, audit log and SQLite journal on), one attested agent, concurrent
//! clients sending batches of CSRs over mTLS. Printed beside the raw
//! in-process signing rate of the same CA code, as a ratio.
//!
//! `cargo bench --bench node_sign` (env: BATCH, CLIENTS, SECONDS;
//! BASELINE_MESHID=/path/to/an/older/meshid adds that binary's server,
//! measured the same way right after).

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{env, pct};

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{Server, TD, key_and_csr, node_channel};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{AttestRequest, SignX509SvidsRequest, X509SvidParams};

fn in_process_rate(csrs: &[Vec<u8>], seconds: f64) -> f64 {
    let ca =
        meshid_server::ca::SigningCa::ephemeral(TD, Duration::from_secs(86400), SystemTime::now())
            .expect("ca");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for csr in csrs {
            ca.sign_x509_svid(
                csr,
                "spiffe://example.org/bench",
                &[],
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .expect("sign");
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// What one server did under the load.
struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
    total: u64,
    audit_lines: usize,
}

/// Starts a server (this build's, or `bin`), attests one agent and runs
/// `clients` closed-loop clients sending batches of `csrs` for `seconds`.
async fn measure(
    bin: Option<&std::ffi::OsStr>,
    csrs: &Arc<Vec<Vec<u8>>>,
    clients: usize,
    seconds: f64,
) -> Figures {
    let config = "max_sign_batch = 10000\ndefault_svid_ttl = \"1h\"";
    let server = match bin {
        Some(b) => Server::start_bin(b, config),
        None => Server::start(config),
    };
    let bundle = server.bundle_pem();
    let alias = format!("spiffe://{TD}/node/bench");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let entry = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/bench"),
        "--selector",
        "unix:uid:1",
    ]);
    let (key, csr) = key_and_csr();
    let mut c = NodeClient::new(node_channel(&server.node_addr, &bundle, None).await);
    let svid = c
        .attest(AttestRequest {
            attestor: "join_token".into(),
            payload: token.into_bytes(),
            csr,
        })
        .await
        .expect("attest")
        .into_inner()
        .svid
        .expect("svid");
    let identity = (svid.cert_chain, key.serialize_der());

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let ch = node_channel(&server.node_addr, &bundle, Some(identity.clone())).await;
        let csrs = csrs.clone();
        let entry = entry.clone();
        tasks.push(tokio::spawn(async move {
            let mut node = NodeClient::new(ch);
            let mut lat = Vec::new();
            let mut signed = 0u64;
            while Instant::now() < deadline {
                let params = csrs
                    .iter()
                    .map(|c| X509SvidParams {
                        entry_id: entry.clone(),
                        csr: c.clone(),
                    })
                    .collect();
                let t = Instant::now();
                let r = node
                    .sign_x509_svids(SignX509SvidsRequest { params })
                    .await
                    .expect("sign")
                    .into_inner();
                lat.push(t.elapsed());
                signed += r.results.iter().filter(|x| x.svid.is_some()).count() as u64;
            }
            (signed, lat)
        }));
    }
    let mut total = 0u64;
    let mut lat = Vec::new();
    for t in tasks {
        let (n, l) = t.await.expect("task");
        total += n;
        lat.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let rate = total as f64 / elapsed;
    // The current audit file and any it was rotated into.
    let audit = server.dir.path().join("data/audit.log");
    let audit_lines = meshid_server::audit::record::rotated_files(&audit)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, p)| p)
        .chain([audit])
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.lines().count())
        .sum::<usize>();

    Figures {
        rate,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        total,
        audit_lines,
    }
}

#[tokio::main]
async fn main() {
    let batch = env("BATCH", 100);
    let clients = env("CLIENTS", 4);
    let seconds = env("SECONDS", 10) as f64;

    let csrs: Arc<Vec<Vec<u8>>> = Arc::new((0..batch).map(|_| key_and_csr().1).collect());
    let baseline = in_process_rate(&csrs, 3.0);
    let ours = measure(None, &csrs, clients, seconds).await;
    // BASELINE_MESHID=/path/to/an/older/meshid: the same load on a server
    // run by that binary, right after, for a before/after in one run.
    let older = match std::env::var_os("BASELINE_MESHID") {
        Some(bin) => Some(measure(Some(&bin), &csrs, clients, seconds).await),
        None => None,
    };

    println!(
        "node API X509-SVID signing: batch={batch} clients={clients} duration={seconds:.0}s, audit log + SQLite journal on; load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<44} {:>12} {:>10} {:>10} {:>8}",
        "path", "SVIDs/s", "p50 batch", "p99 batch", "ratio"
    );
    println!(
        "{:<44} {:>12.0} {:>10} {:>10} {:>8}",
        "in-process CA signing (baseline, 1 thread)", baseline, "-", "-", "1.00"
    );
    let row = |name: &str, f: &Figures| {
        println!(
            "{:<44} {:>12.0} {:>8.1}ms {:>8.1}ms {:>8.2}",
            name,
            f.rate,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.rate / baseline
        );
    };
    row("meshid node API (mTLS, gRPC, audited)", &ours);
    if let Some(o) = &older {
        row("BASELINE_MESHID node API", o);
        println!("this build / BASELINE_MESHID: {:.2}", ours.rate / o.rate);
    }
    println!("ratio node API / in-process: {:.2}", ours.rate / baseline);
    println!(
        "SVIDs signed: {}; audit lines: {}",
        ours.total, ours.audit_lines
    );
}
