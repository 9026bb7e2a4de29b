-- Safe operations: plans bound to the rows they touch, their approvals,
-- the changes applied (with undo), and what those changes removed.
CREATE TABLE plans (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    author          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    -- the plan as JSON (what it changes and each row's fingerprint)
    body            TEXT NOT NULL,
    -- id of the change that applied it; empty while not applied
    applied_change  TEXT NOT NULL DEFAULT ''
);
CREATE TABLE plan_approvals (
    plan_id      TEXT NOT NULL,
    approver     TEXT NOT NULL,
    approved_at  INTEGER NOT NULL,
    PRIMARY KEY (plan_id, approver)
);
CREATE TABLE changes (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    -- JSON object of counts (entries, agents, live_svids)
    counts      TEXT NOT NULL,
    -- undo is possible until then (0: never)
    undo_until  INTEGER NOT NULL,
    undone_at   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX changes_created_at ON changes(created_at);
CREATE TABLE recycle (
    change_id   TEXT NOT NULL,
    -- `entry` (prost Entry) or `agent` (JSON of the agent row)
    item_kind   TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    data        BLOB NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (change_id, item_kind, item_id)
);
