//! End to end with real processes: server, agent, and sidecars for
//! "frontend" (outbound), "payments" (inbound) and "intruder" (outbound).
//! Requests carry the verified caller ID; an intruder and an upstream with the
//! wrong SPIFFE ID are refused; and across at least five rotations a streaming
//! connection is never reset while continuous new requests all succeed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::apps::{echo_app, get, http_app};
use common::{AgentProc, Server, TD, free_port, sidecar, wait_for};

fn readyz_serial(addr: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    if !s.starts_with("HTTP/1.1 200") {
        return None;
    }
    s.lines()
        .find_map(|l| l.strip_prefix("serial: "))
        .map(str::to_string)
}

#[test]
fn mtls_through_sidecars_with_rotation() {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/sc");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = nix::unistd::geteuid().as_raw();
    for n in ["frontend", "payments", "intruder"] {
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/{n}"),
            "--selector",
            &format!("unix:uid:{uid}"),
            "--ttl",
            "4s",
            "--hint",
            n,
        ]);
    }
    let dir = server.dir.path().to_path_buf();
    let agent = AgentProc::start(&dir.join("agent"), &server, Some(&token));
    let ep = agent.endpoint();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let http = http_app(seen.clone());
    let echo = echo_app();
    let [
        b_http,
        b_tcp,
        b_adm,
        a_http,
        a_tcp,
        a_wrong,
        a_adm,
        c_out,
        c_adm,
    ] = [(); 9].map(|()| free_port());
    let _b = sidecar(
        &dir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_http}\"\nforward_to = \"127.0.0.1:{http}\"\nmode = \"http\"\nallow = [\"spiffe://{TD}/frontend\"]\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_tcp}\"\nforward_to = \"127.0.0.1:{echo}\"\nmode = \"tcp\"\nallow = [\"spiffe://{TD}/frontend\"]\n"
        ),
    );
    let _a = sidecar(
        &dir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{a_adm}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_http}\"\nupstream = \"127.0.0.1:{b_http}\"\nserver_id = \"spiffe://{TD}/payments\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_tcp}\"\nupstream = \"127.0.0.1:{b_tcp}\"\nserver_id = \"spiffe://{TD}/payments\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_wrong}\"\nupstream = \"127.0.0.1:{b_http}\"\nserver_id = \"spiffe://{TD}/wrong\"\n"
        ),
    );
    let _c = sidecar(
        &dir,
        "intruder",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{c_adm}\"\nspiffe_id = \"spiffe://{TD}/intruder\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{c_out}\"\nupstream = \"127.0.0.1:{b_http}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        ),
    );
    let b_admin = format!("127.0.0.1:{b_adm}");
    wait_for("payments sidecar ready", Duration::from_secs(30), || {
        readyz_serial(&b_admin)
    });

    // The request carries through; the app sees the verified caller, not the forged header.
    let body = wait_for("frontend path", Duration::from_secs(30), || {
        get(a_http).ok()
    });
    assert!(
        body.ends_with(&format!("caller=spiffe://{TD}/frontend")),
        "{body}"
    );

    // Refusals: a caller the policy does not allow, and an upstream with the wrong ID.
    let before = seen.lock().expect("lock").len();
    assert!(get(c_out).is_err(), "intruder must be refused");
    assert!(
        get(a_wrong).is_err(),
        "upstream with the wrong SPIFFE ID must be refused"
    );
    assert_eq!(
        seen.lock().expect("lock").len(),
        before,
        "no refused request reached the app"
    );

    // Rotation: a streaming connection and continuous requests across >= 5 rotations.
    let stop = Arc::new(AtomicBool::new(false));
    let stream_errors = Arc::new(AtomicUsize::new(0));
    let stream_lines = Arc::new(AtomicUsize::new(0));
    let streamer = {
        let (stop, errors, lines) = (stop.clone(), stream_errors.clone(), stream_lines.clone());
        let mut conn = TcpStream::connect(("127.0.0.1", a_tcp)).expect("stream connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        std::thread::spawn(move || {
            let mut r = BufReader::new(conn.try_clone().expect("clone"));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("tick {i}\n");
                let mut back = String::new();
                if conn.write_all(msg.as_bytes()).is_err()
                    || r.read_line(&mut back).is_err()
                    || back != msg
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                lines.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut serials: Vec<String> = Vec::new();
    let (mut ok, mut failed) = (0usize, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while serials.len() < 6 && Instant::now() < deadline {
        match get(a_http) {
            Ok(_) => ok += 1,
            Err(e) => failed.push(e),
        }
        if let Some(s) = readyz_serial(&b_admin)
            && serials.last() != Some(&s)
        {
            serials.push(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    streamer.join().expect("streamer");
    assert!(
        serials.len() >= 6,
        "saw only {} serials (need 5 rotations): {serials:?}",
        serials.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across rotations: {:?}",
        failed.len(),
        ok + failed.len(),
        failed.first()
    );
    assert_eq!(
        stream_errors.load(Ordering::Relaxed),
        0,
        "the long-lived connection was reset"
    );
    assert!(stream_lines.load(Ordering::Relaxed) > 50);
    let callers = seen.lock().expect("lock").clone();
    assert!(
        callers
            .iter()
            .all(|c| c == &format!("spiffe://{TD}/frontend")),
        "{callers:?}"
    );
    drop(agent);
}
