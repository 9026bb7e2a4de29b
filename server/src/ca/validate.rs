//! Chain validation run before any CA is used or published.
//!
//! An expired intermediate must never be served: every certificate from the
//! signing CA up to a trusted root is checked for its validity window, CA
//! basic constraint and path length, keyCertSign usage, and its signature by
//! the next certificate up.

use std::time::SystemTime;

use x509_parser::prelude::*;

use super::CaError;
use meshid_identity::svid::{to_system_time, unix};

fn subject(c: &X509Certificate<'_>) -> String {
    c.subject().to_string()
}

fn check_ca_cert(c: &X509Certificate<'_>, now: SystemTime, below: u32) -> Result<(), CaError> {
    let nb = to_system_time(c.validity().not_before);
    let na = to_system_time(c.validity().not_after);
    if now > na {
        return Err(CaError::Expired {
            subject: subject(c),
            not_after: humantime::format_rfc3339_seconds(na).to_string(),
        });
    }
    if now < nb {
        return Err(CaError::NotYetValid {
            subject: subject(c),
            not_before: humantime::format_rfc3339_seconds(nb).to_string(),
        });
    }
    let bc = c
        .basic_constraints()
        .map_err(|e| CaError::Invalid(format!("{}: basicConstraints: {e}", subject(c))))?;
    match bc {
        Some(bc) if bc.value.ca => {
            if let Some(len) = bc.value.path_len_constraint
                && below > len
            {
                return Err(CaError::Invalid(format!(
                    "{}: pathLenConstraint {len} does not allow {below} CA certificate(s) below it",
                    subject(c)
                )));
            }
        }
        _ => {
            return Err(CaError::Invalid(format!(
                "{}: not a CA certificate (basicConstraints CA:true missing)",
                subject(c)
            )));
        }
    }
    match c.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        Ok(_) => Err(CaError::Invalid(format!(
            "{}: keyUsage lacks keyCertSign",
            subject(c)
        ))),
        Err(e) => Err(CaError::Invalid(format!("{}: keyUsage: {e}", subject(c)))),
    }
}

/// Validates `chain` (the signing CA first, then intermediates upward) against
/// `roots` at time `now`. Returns the earliest notAfter along the path, which
/// bounds every certificate the signing CA may issue.
pub fn validate_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<SystemTime, CaError> {
    if chain.is_empty() {
        return Err(CaError::Invalid("empty CA chain".into()));
    }
    if roots.is_empty() {
        return Err(CaError::Invalid("no trusted roots".into()));
    }
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .map(|d| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c)
                .map_err(|e| CaError::Invalid(format!("CA certificate does not parse: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let parsed_roots: Vec<X509Certificate<'_>> = roots
        .iter()
        .map(|d| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c)
                .map_err(|e| CaError::Invalid(format!("root certificate does not parse: {e}")))
        })
        .collect::<Result<_, _>>()?;

    let mut earliest: Option<SystemTime> = None;
    for (i, c) in parsed.iter().enumerate() {
        check_ca_cert(c, now, u32::try_from(i).unwrap_or(u32::MAX))?;
        let na = to_system_time(c.validity().not_after);
        earliest = Some(earliest.map_or(na, |e| e.min(na)));
        // Is this certificate itself one of the roots? Then the path ends here.
        if roots.iter().any(|r| r.as_slice() == chain[i].as_slice()) {
            c.verify_signature(None).map_err(|_| {
                CaError::Invalid(format!(
                    "{}: root self-signature does not verify",
                    subject(c)
                ))
            })?;
            return Ok(earliest.unwrap_or(na));
        }
        if let Some(next) = parsed.get(i + 1) {
            if c.issuer() != next.subject() {
                return Err(CaError::Invalid(format!(
                    "{}: issuer {} does not match next certificate {}",
                    subject(c),
                    c.issuer(),
                    subject(next)
                )));
            }
            c.verify_signature(Some(next.public_key())).map_err(|_| {
                CaError::Invalid(format!(
                    "{}: signature does not verify with issuer {}",
                    subject(c),
                    subject(next)
                ))
            })?;
        } else {
            // Last of the chain: must be signed by one of the roots.
            let below = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let mut last_err = CaError::UntrustedChain(format!(
                "{}: issuer {} is not among the trusted roots",
                subject(c),
                c.issuer()
            ));
            for r in parsed_roots.iter().filter(|r| r.subject() == c.issuer()) {
                if c.verify_signature(Some(r.public_key())).is_err() {
                    last_err = CaError::UntrustedChain(format!(
                        "{}: signature does not verify with root {}",
                        subject(c),
                        subject(r)
                    ));
                    continue;
                }
                check_ca_cert(r, now, below)?;
                let rna = to_system_time(r.validity().not_after);
                return Ok(earliest.map_or(rna, |e| e.min(rna)));
            }
            return Err(last_err);
        }
    }
    Err(CaError::UntrustedChain(
        "chain does not reach a root".into(),
    ))
}

/// Validates each certificate of a (federated) bundle on its own: parses, is
/// a CA with keyCertSign, within its validity window.
pub fn validate_bundle_roots(roots: &[Vec<u8>], now: SystemTime) -> Result<(), CaError> {
    if roots.is_empty() {
        return Err(CaError::Invalid("bundle holds no X.509 authorities".into()));
    }
    for d in roots {
        let (_, c) = X509Certificate::from_der(d)
            .map_err(|e| CaError::Invalid(format!("bundle certificate does not parse: {e}")))?;
        check_ca_cert(&c, now, 0)?;
    }
    Ok(())
}

/// notAfter of a DER certificate as Unix seconds (0 if it does not parse).
pub fn not_after_unix(der: &[u8]) -> i64 {
    X509Certificate::from_der(der)
        .map(|(_, c)| unix(to_system_time(c.validity().not_after)))
        .unwrap_or(0)
}
