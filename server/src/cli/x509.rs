//! `meshid server x509 …`: admin certificates (mint under the
//! `[admin_certs]` policy, revoke) and the CRL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use meshid_proto::admin::admin_x509_client::AdminX509Client;
use meshid_proto::admin::{GetCrlRequest, MintX509Request, RevokeX509Request};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use super::{AdminArgs, Output, status};

#[derive(Debug, clap::Subcommand)]
pub(super) enum X509Cmd {
    /// Mint a certificate for a human or tool (admin access, break-glass),
    /// within the server's [admin_certs] policy (max_ttl, allowed_prefixes).
    /// Signed by the active X.509 CA and audited.
    Mint {
        #[command(flatten)]
        admin: AdminArgs,
        /// SPIFFE ID of the certificate; must start with one of [admin_certs] allowed_prefixes.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime, e.g. 8h or 7d; at most [admin_certs] max_ttl.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Sign this PKCS#10 CSR (PEM or DER; only its public key is used).
        /// Without --out the certificate chain is printed on stdout.
        #[arg(long, conflicts_with = "key_out")]
        csr: Option<PathBuf>,
        /// Directory to write cert.pem (chain), bundle.pem and, without
        /// --csr, key.pem (a new ECDSA P-256 key, mode 0600, made here).
        #[arg(long = "out", id = "key_out")]
        out: Option<PathBuf>,
        /// Output format of the summary.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Revoke a certificate by serial: it is listed on the CRL that every
    /// server signs and publishes (GET /crl on the metrics listener) until
    /// its notAfter. Sidecars with crl = "required" or "optional" refuse it.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        /// Hex serial, as `x509 mint` printed it (colons allowed).
        #[arg(long)]
        serial: String,
        /// unspecified, key-compromise, ca-compromise, affiliation-changed,
        /// superseded, cessation-of-operation or privilege-withdrawn.
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// The CRL currently published: a summary, or the CRL itself with --out.
    Crl {
        #[command(flatten)]
        admin: AdminArgs,
        /// Write the CRL here (PEM; DER with --der).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write DER instead of PEM.
        #[arg(long)]
        der: bool,
    },
}

async fn client(path: &Path) -> anyhow::Result<AdminX509Client<Channel>> {
    let p = path.to_path_buf();
    let channel = Endpoint::from_static("http://admin.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is `meshid server run` running, and are you its user or root?)",
                path.display()
            )
        })?;
    Ok(AdminX509Client::new(channel))
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0)),
    )
    .to_string()
}

fn read_csr(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading CSR {}", path.display()))?;
    if raw.starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(&raw).context("CSR PEM is not UTF-8")?;
        let body: String = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE REQUEST-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        use base64::Engine as _;
        return base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .with_context(|| format!("{}: no PEM CERTIFICATE REQUEST", path.display()));
    }
    Ok(raw)
}

fn write(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    meshid_identity::files::write_atomic(path, data, mode)
        .with_context(|| format!("writing {}", path.display()))
}

pub(super) async fn run(cmd: X509Cmd) -> anyhow::Result<()> {
    match cmd {
        X509Cmd::Mint {
            admin,
            spiffe_id,
            ttl,
            csr,
            out,
            output,
        } => {
            let (csr_der, key_pem) = match &csr {
                Some(p) => (read_csr(p)?, None),
                None => {
                    let Some(_) = &out else {
                        anyhow::bail!(
                            "give --out DIR (a new key is written there) or --csr FILE (your own key)"
                        );
                    };
                    let key = rcgen::KeyPair::generate().context("generating a key")?;
                    let req = rcgen::CertificateParams::new(Vec::<String>::new())
                        .context("CSR parameters")?
                        .serialize_request(&key)
                        .context("making the CSR")?;
                    (req.der().to_vec(), Some(key.serialize_pem()))
                }
            };
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut c = client(&admin.admin_socket).await?;
            let m = c
                .mint_x509(MintX509Request {
                    spiffe_id: spiffe_id.clone(),
                    ttl: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                    csr: csr_der,
                })
                .await
                .map_err(status)?
                .into_inner();
            let chain_pem =
                meshid_identity::pem::encode_certs(m.cert_chain.iter().map(Vec::as_slice));
            let bundle_pem = meshid_identity::pem::encode_certs(m.bundle.iter().map(Vec::as_slice));
            let mut files = Vec::new();
            match &out {
                Some(dir) => {
                    if let Some(k) = &key_pem {
                        let p = dir.join("key.pem");
                        write(&p, k.as_bytes(), 0o600)?;
                        files.push(p);
                    }
                    for (name, body) in [("cert.pem", &chain_pem), ("bundle.pem", &bundle_pem)] {
                        let p = dir.join(name);
                        write(&p, body.as_bytes(), 0o644)?;
                        files.push(p);
                    }
                }
                None => print!("{chain_pem}"),
            }
            let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
            match output {
                Output::Json => {
                    let j = json!({"serial": m.serial, "spiffe_id": spiffe_id,
                                   "not_after": m.not_after, "files": files});
                    if out.is_some() {
                        println!("{j}");
                    } else {
                        eprintln!("{j}");
                    }
                }
                Output::Text => eprintln!(
                    "minted {spiffe_id}: serial {} valid until {}{}",
                    m.serial,
                    rfc3339(m.not_after),
                    if files.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", files.join(", "))
                    }
                ),
            }
            Ok(())
        }
        X509Cmd::Revoke {
            admin,
            serial,
            reason,
        } => {
            let mut c = client(&admin.admin_socket).await?;
            let r = c
                .revoke_x509(RevokeX509Request { serial, reason })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{} {} ({}): listed on the CRL until {}; CRL number {} published",
                r.serial,
                if r.already_revoked {
                    "was already revoked"
                } else {
                    "revoked"
                },
                r.spiffe_id,
                rfc3339(r.not_after),
                r.crl_number
            );
            Ok(())
        }
        X509Cmd::Crl { admin, out, der } => {
            let mut c = client(&admin.admin_socket).await?;
            let r = c
                .get_crl(GetCrlRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Some(p) => {
                    let body = if der {
                        r.der.clone()
                    } else {
                        meshid_identity::pem::encode("X509 CRL", &r.der).into_bytes()
                    };
                    write(&p, &body, 0o644)?;
                    println!("wrote {}", p.display());
                }
                None => println!(
                    "CRL number {}: {} revoked certificate(s); thisUpdate {}, nextUpdate {}",
                    r.crl_number,
                    r.revoked,
                    rfc3339(r.this_update),
                    rfc3339(r.next_update)
                ),
            }
            Ok(())
        }
    }
}
