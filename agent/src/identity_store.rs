//! The persisted agent identity: its SVID and key (one 0600 file, written
//! atomically, refused when others may read it) and the bundle saved with it.

use std::path::{Path, PathBuf};

use meshid_identity::SvidInfo;
use meshid_proto::types::{Bundle, X509Svid};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::clock::Clock as _;
use crate::node_api::ClientError;

/// The agent's own SVID and key.
#[derive(Clone)]
pub struct AgentIdentity {
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER key.
    pub key: Vec<u8>,
    /// Parsed leaf.
    pub info: SvidInfo,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.info.spiffe_id.to_string())
            .finish_non_exhaustive()
    }
}

impl AgentIdentity {
    /// From a signed SVID and the key its CSR was made with.
    pub fn new(svid: &X509Svid, key: Vec<u8>) -> Result<Self, ClientError> {
        let leaf = svid
            .cert_chain
            .first()
            .ok_or_else(|| ClientError::Identity("empty chain".into()))?;
        let info = SvidInfo::from_der(leaf).map_err(|e| ClientError::Identity(e.to_string()))?;
        Ok(Self {
            chain: svid.cert_chain.clone(),
            key,
            info,
        })
    }

    pub(crate) fn certified_key(&self) -> Result<CertifiedKey, ClientError> {
        let provider = meshid_identity::crypto::provider();
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                self.key.clone(),
            )))
            .map_err(|e| ClientError::Identity(e.to_string()))?;
        Ok(CertifiedKey::new(
            self.chain
                .iter()
                .map(|d| CertificateDer::from(d.clone()))
                .collect(),
            signing,
        ))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ClientError> {
    meshid_identity::files::write_atomic(path, data, mode).map_err(io(path))
}

/// Creates the agent's data directory 0700 (an existing one is tightened).
pub fn create_data_dir(dir: &Path) -> Result<(), ClientError> {
    meshid_identity::files::create_private_dir(dir).map_err(io(dir))
}

/// Whether the PKCS#8 `key` is the key of the certificate `leaf`.
fn key_matches(key: &[u8], leaf: &[u8]) -> Result<bool, ClientError> {
    use rcgen::PublicKeyData as _;
    let kp = rcgen::KeyPair::try_from(key)
        .map_err(|e| ClientError::Identity(format!("agent key: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| ClientError::Identity(format!("agent SVID: {e}")))?;
    Ok(cert.public_key().raw == kp.subject_public_key_info().as_slice())
}

/// A DER chain (leaf first) and its PKCS#8 key.
type ChainAndKey = (Vec<Vec<u8>>, Vec<u8>);

/// A persisted agent identity and the bundle roots (DER) saved with it.
pub type Persisted = (AgentIdentity, Vec<Vec<u8>>);

/// Files of the persisted agent identity.
///
/// The SVID chain and its key are one file, `agent_identity.pem` (0600),
/// replaced with a single rename, so no crash can leave a key next to a
/// certificate it does not belong to. The separate `agent_svid.pem` +
/// `agent_svid.key` of earlier versions are still read (when they match) and
/// removed on the next save.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
    identity: PathBuf,
    legacy_svid: PathBuf,
    legacy_key: PathBuf,
    bundle: PathBuf,
}

impl IdentityStore {
    /// Under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.to_path_buf(),
            identity: data_dir.join("agent_identity.pem"),
            legacy_svid: data_dir.join("agent_svid.pem"),
            legacy_key: data_dir.join("agent_svid.key"),
            bundle: data_dir.join("bundle.pem"),
        }
    }

    /// Persists identity and bundle (identity file 0600, data dir 0700).
    pub fn save(&self, id: &AgentIdentity, bundle: &Bundle) -> Result<(), ClientError> {
        create_data_dir(&self.dir)?;
        let mut pem = meshid_identity::pem::encode_certs(id.chain.iter().map(Vec::as_slice));
        pem.push_str(&meshid_identity::pem::encode("PRIVATE KEY", &id.key));
        write_atomic(&self.identity, pem.as_bytes(), 0o600)?;
        let mut removed = false;
        for old in [&self.legacy_key, &self.legacy_svid] {
            match std::fs::remove_file(old) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(old)(e)),
            }
        }
        if removed {
            meshid_identity::files::sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        self.save_bundle(bundle)
    }

    /// Persists the bundle roots.
    pub fn save_bundle(&self, bundle: &Bundle) -> Result<(), ClientError> {
        create_data_dir(&self.dir)?;
        write_atomic(
            &self.bundle,
            meshid_identity::pem::encode_certs(bundle.x509_authorities.iter().map(Vec::as_slice))
                .as_bytes(),
            0o644,
        )
    }

    /// The chain (DER, leaf first) and PKCS#8 key, if present and matching.
    fn read_pair(&self) -> Result<Option<ChainAndKey>, ClientError> {
        let (cert_pem, key_pem) = if self.identity.exists() {
            owner_only(&self.identity)?;
            let pem = std::fs::read(&self.identity).map_err(io(&self.identity))?;
            (pem.clone(), pem)
        } else if self.legacy_svid.exists() && self.legacy_key.exists() {
            (
                std::fs::read(&self.legacy_svid).map_err(io(&self.legacy_svid))?,
                {
                    owner_only(&self.legacy_key)?;
                    std::fs::read(&self.legacy_key).map_err(io(&self.legacy_key))?
                },
            )
        } else {
            return Ok(None);
        };
        let chain: Vec<Vec<u8>> = meshid_identity::pem::parse_certs(&cert_pem)
            .map_err(|e| ClientError::Identity(e.to_string()))?
            .into_iter()
            .map(|c| c.to_vec())
            .collect();
        let key = match meshid_identity::pem::parse_key(&key_pem)
            .map_err(|e| ClientError::Identity(e.to_string()))?
        {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(ClientError::Identity("agent key is not PKCS#8".into())),
        };
        let leaf = chain
            .first()
            .ok_or_else(|| ClientError::Identity("no certificate in the agent identity".into()))?;
        if !key_matches(&key, leaf)? {
            tracing::error!(
                dir = %self.dir.display(),
                "the persisted agent key does not belong to the persisted agent SVID; \
                 ignoring both: the agent must attest again"
            );
            return Ok(None);
        }
        Ok(Some((chain, key)))
    }

    /// The persisted identity, if present, matching and not expired. A key
    /// that does not belong to the certificate is logged and never used.
    pub fn load(&self) -> Result<Option<Persisted>, ClientError> {
        let Some((chain, key)) = self.read_pair()? else {
            return Ok(None);
        };
        let roots = load_roots(&self.bundle)?;
        let id = AgentIdentity::new(
            &X509Svid {
                cert_chain: chain,
                ..X509Svid::default()
            },
            key,
        )?;
        if id.info.not_after <= crate::clock::SystemClock.now() {
            tracing::warn!(
                spiffe_id = %id.info.spiffe_id,
                not_after = %humantime::format_rfc3339_seconds(id.info.not_after),
                "persisted agent SVID has expired; the agent must attest again"
            );
            return Ok(None);
        }
        Ok(Some((id, roots)))
    }
}

/// Refuses a private key file that anyone but its owner may read or write:
/// another local user could have read the agent's key (or planted one), so
/// the identity in it proves nothing.
fn owner_only(path: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(ClientError::Identity(format!(
            "{} has mode {mode:o}; the agent's private key must be readable by its owner \
             only (chmod 600), or removed so that the agent attests again",
            path.display()
        )));
    }
    Ok(())
}

/// Reads PEM roots.
pub fn load_roots(path: &Path) -> Result<Vec<Vec<u8>>, ClientError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    Ok(meshid_identity::pem::parse_certs(&pem)
        .map_err(|e| ClientError::Identity(format!("{}: {e}", path.display())))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let store = IdentityStore::new(dir.path());
        let f = dir.path().join("agent_identity.pem");
        std::fs::write(&f, b"not checked before the mode").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = store.load().expect_err("refused");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = store.load().expect_err("still not a valid identity");
        assert!(!e.to_string().contains("chmod 600"), "{e}");
    }
}
