-- meshid registry schema (PostgreSQL). The same tables as the SQLite schema,
-- plus the store-wide change revision that servers sharing the database use
-- to tell each other about changes.
CREATE TABLE entries (
    id          TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    parent_id   TEXT NOT NULL,
    -- prost-encoded meshid.types.v1.Entry
    data        BYTEA NOT NULL,
    revision    BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    -- insertion order, for listings (created_at has one-second resolution)
    seq         BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX entries_parent_id ON entries(parent_id);
CREATE INDEX entries_spiffe_id ON entries(spiffe_id);
CREATE INDEX entries_order ON entries(created_at, seq);

CREATE TABLE join_tokens (
    -- SHA-256 (hex) of the token: the token itself is never stored.
    token_hash  TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL,
    alias_id    TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE agents (
    spiffe_id    TEXT PRIMARY KEY,
    attestor     TEXT NOT NULL,
    serial       TEXT NOT NULL,
    prev_serial  TEXT NOT NULL,
    expires_at   BIGINT NOT NULL,
    banned       BOOLEAN NOT NULL DEFAULT FALSE,
    aliases      TEXT[] NOT NULL,
    attested_at  BIGINT NOT NULL
);

CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY,
    federated    BOOLEAN NOT NULL,
    -- prost-encoded meshid.types.v1.Bundle
    data         BYTEA NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- The CA journal: every X.509 signing CA and JWT signing key of every server
-- sharing this store, with its rotation state. Private keys are not here:
-- each stays on the disk of the server that owns it.
CREATE TABLE ca_journal (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    owner       TEXT NOT NULL,
    state       TEXT NOT NULL,
    -- prost-encoded meshid.types.v1.Authority
    data        BYTEA NOT NULL,
    revision    BIGINT NOT NULL,
    -- insertion order (SQLite's rowid)
    seq         BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX ca_journal_owner ON ca_journal(owner, kind);

CREATE TABLE issued_certs (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    not_after   BIGINT NOT NULL,
    issued_at   BIGINT NOT NULL,
    -- Which authority signed it (ca_journal.id).
    ca_id       TEXT NOT NULL DEFAULT '',
    -- insertion order (SQLite's rowid): the newest certificate of an
    -- (agent, entry, SPIFFE ID) slot is the one with the largest seq.
    seq         BIGINT GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX issued_certs_not_after ON issued_certs(not_after);
CREATE INDEX issued_certs_ca ON issued_certs(ca_id, not_after);
CREATE INDEX issued_certs_slot ON issued_certs(agent_id, entry_id, spiffe_id, seq);

-- The store-wide change revision: one row, bumped by every change agents must
-- see. Its row lock is held until commit, so revisions are handed out in
-- commit order and "revision > cursor" never skips a change.
CREATE TABLE store_revision (
    id        SMALLINT PRIMARY KEY CHECK (id = 1),
    revision  BIGINT NOT NULL
);
INSERT INTO store_revision (id, revision) VALUES (1, 0);

-- What each revision changed (kept for an hour; the cursor is the revision).
CREATE TABLE change_log (
    revision  BIGINT PRIMARY KEY,
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    at        BIGINT NOT NULL
);
CREATE INDEX change_log_at ON change_log(at);

-- Bumps the revision, logs the change and notifies listeners on commit.
-- Called last in a transaction, after its row changes, so that the revision
-- row is always the last lock taken.
CREATE FUNCTION meshid_note_change(p_kind TEXT, p_key TEXT) RETURNS BIGINT AS $$
DECLARE
    rev BIGINT;
BEGIN
    UPDATE store_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision INTO rev;
    INSERT INTO change_log (revision, kind, key, at)
        VALUES (rev, p_kind, p_key, extract(epoch FROM now())::BIGINT);
    PERFORM pg_notify('meshid_changes', rev::TEXT);
    RETURN rev;
END
$$ LANGUAGE plpgsql;
