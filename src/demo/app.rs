//! The demo's HTTP: the payments app behind the inbound sidecar, the
//! frontend's requests through the outbound sidecar, and the sidecar's
//! admin endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::bail;

use super::TD;

pub(super) fn http_get(conn: &mut TcpStream, path: &str) -> anyhow::Result<String> {
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: payments\r\nx-spiffe-id: spiffe://{TD}/forged\r\n\r\n"
    )?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut len = 0usize;
    let mut status = String::new();
    r.read_line(&mut status)?;
    loop {
        let mut l = String::new();
        r.read_line(&mut l)?;
        if l.trim().is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    if !status.contains(" 200 ") {
        bail!("status {}", status.trim());
    }
    Ok(String::from_utf8_lossy(&body).to_string())
}

pub(super) fn admin_get(addr: &str, path: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.starts_with("HTTP/1.1 200").then_some(s)
}

pub(super) fn serial_of(readyz: &str) -> String {
    readyz
        .lines()
        .find_map(|l| l.strip_prefix("serial: "))
        .unwrap_or("?")
        .to_string()
}

/// The payments app: answers every request with the caller the sidecar verified.
pub(super) fn run_app(addr: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr)?;
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut w = match conn.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut r = BufReader::new(conn);
            loop {
                let mut caller = String::from("(none)");
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
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
                let body = format!("payments served caller {caller}");
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
    Ok(())
}
