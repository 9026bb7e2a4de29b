-- Revoked certificates (`meshid server x509 revoke`): listed on the CRL
-- until their notAfter.
CREATE TABLE revoked_certs (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    not_after   INTEGER NOT NULL,
    revoked_at  INTEGER NOT NULL,
    -- RFC 5280 CRLReason code
    reason      INTEGER NOT NULL
);
CREATE INDEX revoked_certs_not_after ON revoked_certs(not_after);
