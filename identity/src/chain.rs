//! Does a certificate chain still verify against a set of roots? Agents and
//! sidecars ask this before accepting a bundle update: an update that would
//! stop verifying their own current SVID is refused (fail secure), and the
//! last good bundle is kept.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::*;

use crate::svid::to_system_time;

/// Verifies `chain` (leaf first, then intermediates) against `roots` (DER)
/// at `now`, for client authentication. Returns why not.
pub fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], now: SystemTime) -> Result<(), String> {
    let leaf = chain.first().ok_or("empty chain")?;
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    if anchors.is_empty() {
        return Err("no usable root".into());
    }
    let leaf = CertificateDer::from(leaf.as_slice());
    let ee = EndEntityCert::try_from(&leaf).map_err(|e| format!("leaf: {e:?}"))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let secs = now.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
    let provider = crate::crypto::provider();
    // As in the TLS verifiers: a chain that starts being valid within the
    // clock-skew tolerance is verified at that time (notAfter never relaxed).
    let limit = secs.as_secs() + crate::verify::CLOCK_SKEW_TOLERANCE.as_secs();
    let mut at = UnixTime::since_unix_epoch(secs);
    loop {
        match ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &anchors,
            &intermediates,
            at,
            KeyUsage::client_auth(),
            None,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(webpki::Error::CertNotValidYet { not_before, .. })
                if not_before.as_secs() > at.as_secs() && not_before.as_secs() <= limit =>
            {
                at = not_before;
            }
            Err(e) => return Err(format!("{e:?}")),
        }
    }
}

/// Splits roots into those still valid at `now` and a description of each
/// one left out (expired, not yet valid even allowing for
/// [`CLOCK_SKEW_TOLERANCE`](crate::verify::CLOCK_SKEW_TOLERANCE), or
/// unparsable). An expired CA is
/// never served: some TLS stacks refuse a whole bundle that holds one.
pub fn prune_roots(roots: &[Vec<u8>], now: SystemTime) -> (Vec<Vec<u8>>, Vec<String>) {
    let mut keep = Vec::new();
    let mut dropped = Vec::new();
    for r in roots {
        match X509Certificate::from_der(r) {
            Ok((_, c)) => {
                let na = to_system_time(c.validity().not_after);
                let nb = to_system_time(c.validity().not_before);
                if na <= now {
                    dropped.push(format!("{} (expired)", c.subject()));
                } else if nb > now + crate::verify::CLOCK_SKEW_TOLERANCE {
                    dropped.push(format!("{} (not yet valid)", c.subject()));
                } else {
                    keep.push(r.clone());
                }
            }
            Err(e) => dropped.push(format!("unparsable certificate ({e})")),
        }
    }
    (keep, dropped)
}
