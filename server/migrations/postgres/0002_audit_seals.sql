-- Sealed audit chain heads: one chain per server (server_id is derived from
-- the server's seal key), so servers sharing a store keep separate chains.
CREATE TABLE audit_seals (
    server_id    TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    -- hex SHA-256 of the sealed record
    hash         TEXT NOT NULL,
    sealed_at_ms BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    -- raw Ed25519 public key and signature over the seal message
    public_key   BYTEA NOT NULL,
    signature    BYTEA NOT NULL,
    PRIMARY KEY (server_id, seq)
);
