//! TLS 1.3 session tickets that never outlive the SVID that issued them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::server::ProducesTickets;

use super::IdentityError;

/// Session tickets that never outlive the SVID that issued them.
#[derive(Debug)]
pub(crate) struct SvidBoundTicketer {
    inner: Arc<dyn ProducesTickets>,
    not_after: SystemTime,
}

impl SvidBoundTicketer {
    /// A ticketer with a key of its own, for an SVID ending at `not_after`.
    pub(crate) fn shared(not_after: SystemTime) -> Result<Arc<dyn ProducesTickets>, IdentityError> {
        Ok(Arc::new(Self {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new()?,
            not_after,
        }))
    }

    fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

impl ProducesTickets for SvidBoundTicketer {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        let remaining = u32::try_from(self.remaining().as_secs()).unwrap_or(u32::MAX);
        self.inner.lifetime().min(remaining)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        if self.remaining().is_zero() {
            return None;
        }
        self.inner.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if self.remaining().is_zero() {
            return None;
        }
        self.inner.decrypt(cipher)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ticketer(not_after: SystemTime) -> SvidBoundTicketer {
        SvidBoundTicketer {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            not_after,
        }
    }

    #[test]
    fn ticket_lifetime_is_capped_by_svid_lifetime() {
        let t = ticketer(SystemTime::now() + Duration::from_secs(600));
        assert!(t.enabled());
        assert!(
            t.lifetime() <= 600 && t.lifetime() >= 590,
            "{}",
            t.lifetime()
        );
        let c = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&c).unwrap(), b"session");

        // A long-lived SVID keeps the ticketer's own (shorter) lifetime.
        let long = ticketer(SystemTime::now() + Duration::from_secs(30 * 24 * 3600));
        assert!(long.lifetime() <= 24 * 3600);
    }

    #[test]
    fn no_tickets_after_svid_expiry() {
        let live = ticketer(SystemTime::now() + Duration::from_secs(600));
        let c = live.encrypt(b"session").unwrap();
        let expired = SvidBoundTicketer {
            inner: live.inner.clone(),
            not_after: SystemTime::now() - Duration::from_secs(1),
        };
        assert_eq!(expired.lifetime(), 0);
        assert!(expired.encrypt(b"session").is_none());
        assert!(expired.decrypt(&c).is_none(), "tickets die with the SVID");
    }
}
