//! Small apps behind sidecars in end-to-end tests: an HTTP app that records
//! the caller ID it is given, a line echo app, and a one-shot GET.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// HTTP app recording the x-spiffe-id of every request.
pub fn http_app(seen: Arc<Mutex<Vec<String>>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else { return };
                let mut r = BufReader::new(c);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut caller = String::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("x-spiffe-id:") {
                            caller = v.trim().to_string();
                        }
                    }
                    if let Ok(mut s) = seen.lock() {
                        s.push(caller.clone());
                    }
                    let body = format!("caller={caller}");
                    if write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Line echo app.
pub fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else { return };
                let mut r = BufReader::new(c);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if w.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

pub fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nx-spiffe-id: spiffe://example.org/forged\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.starts_with("HTTP/1.1 200") {
        Ok(out)
    } else {
        Err(format!("no 200: {out:?}"))
    }
}

/// Traffic through a sidecar pair while something else happens: one
/// keep-alive connection echoing a line every 100 ms, and a fresh
/// connection (a GET) every 50 ms. Stopping returns what happened.
pub struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stream_lines: Arc<std::sync::atomic::AtomicUsize>,
    stream_error: Arc<Mutex<Option<String>>>,
    requests_ok: Arc<std::sync::atomic::AtomicUsize>,
    requests_failed: Arc<Mutex<Vec<String>>>,
}

/// What [`Traffic`] saw.
#[derive(Debug)]
pub struct TrafficReport {
    pub stream_lines: usize,
    pub stream_error: Option<String>,
    pub requests_ok: usize,
    pub requests_failed: Vec<String>,
}

impl Traffic {
    /// Starts the keep-alive echo through `tcp_port` and fresh GETs through
    /// `http_port`.
    pub fn start(tcp_port: u16, http_port: u16) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let stream_lines = Arc::new(AtomicUsize::new(0));
        let stream_error = Arc::new(Mutex::new(None));
        let requests_ok = Arc::new(AtomicUsize::new(0));
        let requests_failed = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, lines, err) = (stop.clone(), stream_lines.clone(), stream_error.clone());
            let mut conn = TcpStream::connect(("127.0.0.1", tcp_port)).expect("stream connect");
            conn.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            threads.push(std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("tick {i}\n");
                    let mut back = String::new();
                    let res = conn
                        .write_all(msg.as_bytes())
                        .map_err(|e| e.to_string())
                        .and_then(|()| r.read_line(&mut back).map_err(|e| e.to_string()));
                    if let Err(e) = res.and_then(|_| {
                        if back == msg {
                            Ok(())
                        } else {
                            Err(format!("echo mismatch: {back:?}"))
                        }
                    }) {
                        *err.lock().expect("lock") = Some(format!("after {i} lines: {e}"));
                        return;
                    }
                    lines.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        {
            let (stop, ok, failed) = (stop.clone(), requests_ok.clone(), requests_failed.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match get(http_port) {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failed.lock().expect("lock").push(e),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Self {
            stop,
            threads,
            stream_lines,
            stream_error,
            requests_ok,
            requests_failed,
        }
    }

    /// Lines echoed on the keep-alive connection so far.
    pub fn stream_lines(&self) -> usize {
        self.stream_lines.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests that failed so far.
    pub fn failures(&self) -> usize {
        self.requests_failed.lock().expect("lock").len()
    }

    /// Stops both and reports.
    pub fn stop(self) -> TrafficReport {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("traffic thread");
        }
        TrafficReport {
            stream_lines: self.stream_lines.load(Ordering::Relaxed),
            stream_error: self.stream_error.lock().expect("lock").clone(),
            requests_ok: self.requests_ok.load(Ordering::Relaxed),
            requests_failed: self.requests_failed.lock().expect("lock").clone(),
        }
    }
}
