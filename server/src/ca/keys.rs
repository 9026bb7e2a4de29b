//! Private keys of the authorities this server owns, on its own disk:
//! `<data_dir>/ca/keys/<kind>-<id>.key`, PEM PKCS#8, mode 0600, written
//! atomically. The store holds only public material, so a database dump or a
//! shared PostgreSQL never carries a signing key (ARCHITECTURE.md explains
//! the choice).

use std::path::{Path, PathBuf};

use rcgen::KeyPair;

use super::{CaError, io_err, keyfile};

/// The directory of this server's authority keys.
#[derive(Debug, Clone)]
pub struct KeyDir {
    dir: PathBuf,
}

fn safe(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl KeyDir {
    /// `<data_dir>/ca/keys`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("ca").join("keys"),
        }
    }

    fn path(&self, kind: &str, id: &str) -> Result<PathBuf, CaError> {
        if !safe(kind) || !safe(id) {
            return Err(CaError::Invalid(format!(
                "authority id {id:?} is not a safe file name"
            )));
        }
        Ok(self.dir.join(format!("{kind}-{id}.key")))
    }

    /// Writes a key (PEM), 0600, atomically.
    pub fn put_pem(&self, kind: &str, id: &str, pem: &str) -> Result<(), CaError> {
        let p = self.path(kind, id)?;
        keyfile::write_secret(&p, pem.as_bytes()).map_err(io_err(&p))
    }

    /// Writes an rcgen key pair.
    pub fn put(&self, kind: &str, id: &str, key: &KeyPair) -> Result<(), CaError> {
        self.put_pem(kind, id, &key.serialize_pem())
    }

    /// Writes PKCS#8 DER (as PEM).
    pub fn put_pkcs8(&self, kind: &str, id: &str, der: &[u8]) -> Result<(), CaError> {
        self.put_pem(kind, id, &meshid_identity::pem::encode("PRIVATE KEY", der))
    }

    /// Reads an rcgen key pair.
    pub fn get(&self, kind: &str, id: &str) -> Result<KeyPair, CaError> {
        super::mint::read_key(&self.path(kind, id)?)
    }

    /// Reads PKCS#8 DER.
    pub fn get_pkcs8(&self, kind: &str, id: &str) -> Result<Vec<u8>, CaError> {
        let p = self.path(kind, id)?;
        let pem = std::fs::read(&p).map_err(io_err(&p))?;
        match meshid_identity::pem::parse_key(&pem)
            .map_err(|e| CaError::Invalid(format!("{}: {e}", p.display())))?
        {
            rustls_pki_types::PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
            _ => Err(CaError::Invalid(format!("{}: not PKCS#8", p.display()))),
        }
    }

    /// Whether this server holds the key.
    pub fn has(&self, kind: &str, id: &str) -> bool {
        self.path(kind, id).is_ok_and(|p| p.exists())
    }

    /// Deletes a key that will never sign again (removed authority).
    pub fn delete(&self, kind: &str, id: &str) -> Result<(), CaError> {
        let p = self.path(kind, id)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&p)(e)),
        }
    }
}
