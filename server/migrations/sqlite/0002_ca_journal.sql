-- The CA journal: every X.509 signing CA and JWT signing key of every server
-- sharing this store, with its rotation state. Private keys are not here:
-- each stays on the disk of the server that owns it (see ARCHITECTURE.md).
CREATE TABLE ca_journal (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    state       TEXT NOT NULL,
    -- prost-encoded meshid.types.v1.Authority
    data        BLOB NOT NULL,
    revision    INTEGER NOT NULL
);
CREATE INDEX ca_journal_owner ON ca_journal(owner, kind);

-- Superseded by ca_journal.
DROP TABLE ca_keys;

-- Which authority signed each certificate, so that a retired CA leaves the
-- bundle only after the last certificate it signed has expired, and a
-- revocation can name every live certificate it would invalidate.
ALTER TABLE issued_certs ADD COLUMN ca_id TEXT NOT NULL DEFAULT '';
CREATE INDEX issued_certs_ca ON issued_certs(ca_id, not_after);
CREATE INDEX issued_certs_slot ON issued_certs(agent_id, entry_id, spiffe_id);
