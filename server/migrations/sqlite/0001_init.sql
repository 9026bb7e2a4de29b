-- meshid registry schema (SQLite).
CREATE TABLE entries (
    id          TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    parent_id   TEXT NOT NULL,
    -- prost-encoded meshid.types.v1.Entry
    data        BLOB NOT NULL,
    revision    INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX entries_parent_id ON entries(parent_id);
CREATE INDEX entries_spiffe_id ON entries(spiffe_id);

CREATE TABLE join_tokens (
    -- SHA-256 (hex) of the token: the token itself is never stored.
    token_hash  TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL,
    alias_id    TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE agents (
    spiffe_id    TEXT PRIMARY KEY,
    attestor     TEXT NOT NULL,
    serial       TEXT NOT NULL,
    prev_serial  TEXT NOT NULL,
    expires_at   INTEGER NOT NULL,
    banned       INTEGER NOT NULL DEFAULT 0,
    -- JSON array of alias SPIFFE IDs
    aliases      TEXT NOT NULL,
    attested_at  INTEGER NOT NULL
);

CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY,
    federated    INTEGER NOT NULL,
    -- prost-encoded meshid.types.v1.Bundle
    data         BLOB NOT NULL,
    updated_at   INTEGER NOT NULL
);

CREATE TABLE ca_keys (
    serial      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    not_before  INTEGER NOT NULL,
    not_after   INTEGER NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE issued_certs (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    not_after   INTEGER NOT NULL,
    issued_at   INTEGER NOT NULL
);
CREATE INDEX issued_certs_not_after ON issued_certs(not_after);
