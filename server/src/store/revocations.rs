//! Revoked certificates: what `meshid server x509 revoke` records and every
//! server's CRL lists until the certificate's notAfter.

/// One revoked certificate.
/// Read from a `revoked_certs` row the same way by both stores.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RevokedCert {
    /// Lowercase hex serial (as journaled in `issued_certs`).
    pub serial: String,
    /// SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// The certificate's notAfter, Unix seconds: listed on the CRL until then.
    pub not_after: i64,
    /// When the revocation was recorded, Unix seconds.
    pub revoked_at: i64,
    /// RFC 5280 reason code (0 = unspecified).
    pub reason: i64,
}
