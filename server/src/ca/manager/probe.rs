//! What a staged trust change needs of the CA manager: a probe SVID signed
//! by the candidate (prepared) authority for a canary agent's self-test, and
//! the authorities a halted change holds back from automatic activation.

use std::time::{Duration, SystemTime};

use super::{CaManager, own};
use crate::ca::mint::X509;
use crate::ca::schedule::state;
use crate::ca::{CaError, IssuedSvid, SigningCa};

/// How long a probe SVID is valid: long enough for one self-test.
pub const PROBE_TTL: Duration = Duration::from_secs(300);

impl CaManager {
    /// Signs a short-lived SVID for `spiffe_id` over the key of `csr` with
    /// the prepared or active X.509 authority `id` of this server. It is for a canary
    /// agent's self-test only: it is not recorded as issued (it never counts
    /// as live), and the caller audits it.
    pub fn sign_probe(
        &self,
        id: &str,
        journal: &[meshid_proto::types::Authority],
        csr: &[u8],
        spiffe_id: &str,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        let a = own(journal, &self.owner, X509)
            .into_iter()
            .find(|a| a.id == id && (a.state == state::PREPARED || a.state == state::ACTIVE))
            .ok_or_else(|| CaError::NotFound(format!("prepared or active authority {id}")))?;
        let ca = SigningCa::from_authority(&self.trust_domain, &a, self.keys.get(X509, id)?, now)?;
        ca.sign_x509_svid(csr, spiffe_id, &[], PROBE_TTL, now)
            .map_err(|e| CaError::Refused(format!("probe not signed: {e}")))
    }

    /// Holds `id` back from automatic activation (a staged activation of it
    /// halted); an operator's activation releases it.
    pub fn hold(&self, id: &str) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string());
    }

    /// Releases a held authority.
    pub fn release(&self, id: &str) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// Whether `id` is held back from automatic activation.
    pub fn is_held(&self, id: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
    }
}
