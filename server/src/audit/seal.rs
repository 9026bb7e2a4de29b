//! Sealed chain heads: the server signs (sequence, hash, time) of the last
//! durable audit record with an Ed25519 key of its own and stores it, so a
//! cut tail or a replaced file shows even where the chain itself is intact.
//!
//! The key is `<data_dir>/audit-seal.key` (PKCS#8, mode 0600), made on first
//! start. The chain's id — the key under which the store keeps its seals, so
//! that servers sharing one store keep separate chains — is the first 16
//! bytes of the SHA-256 of the public key, in hex.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use super::record::{Hash, hex32, parse_hex32};
use super::{AuditLog, Event};
use crate::store::{AuditSeal, Store};

/// File name of the seal key inside the data directory.
pub const KEY_FILE: &str = "audit-seal.key";

/// Domain-separation line that starts every signed seal message.
pub const SEAL_CONTEXT: &str = "meshid-audit-seal-v1";

/// Seal key failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealKeyError {
    /// Reading or writing the key file failed.
    #[error("audit seal key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file is not an Ed25519 PKCS#8 key.
    #[error("audit seal key {0}: not an Ed25519 PKCS#8 key")]
    Invalid(PathBuf),
    /// Group or others may read the key.
    #[error(
        "audit seal key {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
    )]
    LoosePermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// There is no key (the verifier never creates one).
    #[error(
        "no audit seal key at {0}: the server creates it on its first start with this data_dir"
    )]
    Missing(PathBuf),
}

/// The server's seal signing key.
pub struct SealKey {
    key: Ed25519KeyPair,
    chain_id: String,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("chain_id", &self.chain_id)
            .finish_non_exhaustive()
    }
}

/// The chain id of a public key.
pub fn chain_id(public_key: &[u8]) -> String {
    hex::encode(&super::record::hash(public_key)[..16])
}

impl SealKey {
    /// Loads `<data_dir>/audit-seal.key`, creating it (0600) when absent.
    /// Returns the key and whether it was created.
    pub fn load_or_create(data_dir: &Path) -> Result<(Self, bool), SealKeyError> {
        let path = data_dir.join(KEY_FILE);
        match Self::load(data_dir) {
            Err(SealKeyError::Missing(_)) => {}
            other => return other.map(|k| (k, false)),
        }
        let io = |source| SealKeyError::Io {
            path: path.clone(),
            source,
        };
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| io(std::io::Error::other("cannot generate an Ed25519 key")))?;
        // A unique temporary name, created exclusively with 0600, then
        // renamed: a crash never leaves a half-written key under the name.
        let tmp = data_dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(doc.as_ref()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok((Self::load(data_dir)?, true))
    }

    /// Loads an existing key; refuses one that group or others can read.
    pub fn load(data_dir: &Path) -> Result<Self, SealKeyError> {
        let path = data_dir.join(KEY_FILE);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SealKeyError::Missing(path));
            }
            Err(source) => return Err(SealKeyError::Io { path, source }),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealKeyError::LoosePermissions { path, mode });
        }
        let der = std::fs::read(&path).map_err(|source| SealKeyError::Io {
            path: path.clone(),
            source,
        })?;
        let key = Ed25519KeyPair::from_pkcs8(&der).map_err(|_| SealKeyError::Invalid(path))?;
        let chain_id = chain_id(key.public_key().as_ref());
        Ok(Self { key, chain_id })
    }

    /// The chain id (the store key of this server's seals).
    pub fn chain_id(&self) -> &str {
        &self.chain_id
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// Seals a chain head.
    pub fn seal(&self, seq: u64, hash: &Hash, sealed_at_ms: i64, reason: &str) -> AuditSeal {
        let msg = message(&self.chain_id, seq, &hex32(hash), sealed_at_ms);
        AuditSeal {
            server_id: self.chain_id.clone(),
            seq: i64::try_from(seq).unwrap_or(i64::MAX),
            hash: hex32(hash),
            sealed_at_ms,
            reason: reason.to_string(),
            public_key: self.public_key().to_vec(),
            signature: self.key.sign(&msg).as_ref().to_vec(),
        }
    }
}

/// The exact bytes a seal's signature covers (UTF-8, each line ends with
/// `\n`): the context, then `chain_id=`, `seq=`, `hash=` and `sealed_at_ms=`.
pub fn message(chain_id: &str, seq: u64, hash_hex: &str, sealed_at_ms: i64) -> Vec<u8> {
    format!(
        "{SEAL_CONTEXT}\nchain_id={chain_id}\nseq={seq}\nhash={hash_hex}\nsealed_at_ms={sealed_at_ms}\n"
    )
    .into_bytes()
}

/// Why a stored seal is not genuine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadSeal {
    /// Signed by another key than the server's.
    #[error("it carries another public key than this server's seal key")]
    WrongKey,
    /// The signature does not verify.
    #[error("its signature does not verify")]
    BadSignature,
    /// A field is out of range or malformed.
    #[error("it is malformed: {0}")]
    Malformed(String),
}

/// Checks a seal's signature against the server's public key.
pub fn verify(seal: &AuditSeal, public_key: &[u8]) -> Result<(u64, Hash), BadSeal> {
    if seal.public_key != public_key {
        return Err(BadSeal::WrongKey);
    }
    let seq = u64::try_from(seal.seq)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| BadSeal::Malformed(format!("seq {}", seal.seq)))?;
    let hash = parse_hex32(&seal.hash)
        .ok_or_else(|| BadSeal::Malformed(format!("hash {:?}", seal.hash)))?;
    let msg = message(&seal.server_id, seq, &seal.hash, seal.sealed_at_ms);
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&msg, &seal.signature)
        .map_err(|_| BadSeal::BadSignature)?;
    Ok((seq, hash))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Seals the chain head into the store: every `seal_every_records` records,
/// every `seal_every` while records are unsealed, and on [`Sealer::close`].
#[derive(Clone)]
pub struct Sealer {
    inner: Arc<SealerInner>,
}

struct SealerInner {
    key: SealKey,
    store: Arc<dyn Store>,
    audit: AuditLog,
    /// Serializes sealing (timer, count and shutdown may race); holds the
    /// time of the last failure, so a failing store is retried at the
    /// interval, not on every write.
    lock: tokio::sync::Mutex<Option<std::time::Instant>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("chain_id", &self.inner.key.chain_id)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Reconciles the log with the newest stored seal, then starts sealing.
    ///
    /// If the store holds a seal beyond the log's last record, records were
    /// removed while the server was down: the chain continues from the seal
    /// (so the gap stays visible to `audit verify`) and an `audit_chain_gap`
    /// record says so. A seal that disagrees with the record it names is
    /// reported likewise.
    pub async fn start(
        key: SealKey,
        store: Arc<dyn Store>,
        audit: AuditLog,
    ) -> Result<Self, super::AuditError> {
        let latest = store
            .latest_audit_seal(key.chain_id())
            .await
            .map_err(|e| super::AuditError::Other(format!("reading audit seals: {e}")))?;
        let head = audit.head();
        if let Some(seal) = &latest {
            match verify(seal, key.public_key()) {
                Err(e) => {
                    tracing::error!(seq = seal.seq, error = %e, "the newest audit seal in the store is not genuine; run `meshid server audit verify`");
                    audit
                        .record(vec![
                            Event::new("audit_seal_invalid")
                                .with("sealed_seq", seal.seq)
                                .with("error", e.to_string()),
                        ])
                        .await?;
                }
                Ok((seq, hash)) if seq > head.seq => {
                    tracing::error!(
                        log_head = head.seq,
                        sealed = seq,
                        "the audit log ends before its newest seal: records were removed while the server was down; the chain continues from the seal and `meshid server audit verify` reports the gap"
                    );
                    audit
                        .rebase(
                            seq,
                            hash,
                            Event::new("audit_chain_gap")
                                .with("log_head_seq", head.seq)
                                .with("sealed_seq", seq)
                                .with("sealed_at_ms", seal.sealed_at_ms),
                        )
                        .await?;
                }
                Ok((seq, hash)) if seq == head.seq && hash != head.hash => {
                    tracing::error!(
                        seq,
                        "the audit log's last record differs from its seal: the record was changed; `meshid server audit verify` reports it"
                    );
                    audit
                        .record(vec![
                            Event::new("audit_chain_mismatch")
                                .with("sealed_seq", seq)
                                .with("sealed_hash", seal.hash.clone())
                                .with("log_hash", hex32(&head.hash)),
                        ])
                        .await?;
                }
                Ok(_) => {}
            }
        }
        let sealed = latest
            .as_ref()
            .and_then(|s| u64::try_from(s.seq).ok())
            .unwrap_or(0);
        audit.shared().sealed_seq.store(sealed, Ordering::SeqCst);
        let (stop, _) = tokio::sync::watch::channel(false);
        let this = Self {
            inner: Arc::new(SealerInner {
                key,
                store,
                audit,
                lock: tokio::sync::Mutex::new(None),
                stop,
            }),
        };
        this.spawn();
        Ok(this)
    }

    /// The chain id.
    pub fn chain_id(&self) -> &str {
        self.inner.key.chain_id()
    }

    fn spawn(&self) {
        let this = self.clone();
        let mut stop = self.inner.stop.subscribe();
        let shared = self.inner.audit.shared().clone();
        let every = self.inner.audit.settings().seal_every;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shared.seal_wanted.notified() => {
                        this.seal("records").await;
                    }
                    () = tokio::time::sleep(every) => {
                        this.seal("interval").await;
                    }
                    r = stop.changed() => if r.is_err() || *stop.borrow() { break },
                }
            }
        });
    }

    /// Seals the current head if records were written since the last seal.
    /// Returns the sealed sequence number, if a seal was stored. After a
    /// failure, count-triggered seals wait for the interval.
    pub async fn seal(&self, reason: &str) -> Option<u64> {
        let inner = &self.inner;
        let mut last_failure = inner.lock.lock().await;
        let head = inner.audit.head();
        let shared = inner.audit.shared();
        if head.seq == 0 || head.seq <= shared.sealed_seq.load(Ordering::SeqCst) {
            return None;
        }
        if reason == "records"
            && last_failure.is_some_and(|t| t.elapsed() < inner.audit.settings().seal_every)
        {
            return None;
        }
        let seal = inner.key.seal(head.seq, &head.hash, now_ms(), reason);
        match inner.store.put_audit_seal(&seal).await {
            Ok(()) => {
                *last_failure = None;
                shared.sealed_seq.store(head.seq, Ordering::SeqCst);
                shared.counters.seals_ok.inc();
                tracing::debug!(seq = head.seq, reason, "audit chain head sealed");
                Some(head.seq)
            }
            Err(e) => {
                *last_failure = Some(std::time::Instant::now());
                shared.counters.seals_failed.inc();
                tracing::error!(seq = head.seq, reason, error = %e, "cannot store the audit seal; retrying at the next interval");
                None
            }
        }
    }

    /// Stops the timer and seals the final head (graceful shutdown).
    pub async fn close(&self) -> Option<u64> {
        let _ = self.inner.stop.send(true);
        self.seal("shutdown").await
    }
}
