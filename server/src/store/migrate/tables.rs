//! What `store migrate` copies: every data table of the SQLite schema, its
//! columns and their types.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Int,
    Blob,
    Bool,
    /// A list of strings: JSON text in SQLite, `TEXT[]` in PostgreSQL.
    TextList,
}

pub(super) struct Table {
    pub(super) name: &'static str,
    pub(super) cols: &'static [(&'static str, Kind)],
    /// SQLite order of the copy (PostgreSQL keeps insertion order where it
    /// matters, e.g. entry listings).
    pub(super) order: &'static str,
}

use Kind::{Blob, Bool, Int, Text, TextList};

/// Every table of the SQLite schema that holds data. A source table not
/// listed here stops the migration rather than being left behind.
pub(super) const TABLES: &[Table] = &[
    Table {
        name: "entries",
        cols: &[
            ("id", Text),
            ("spiffe_id", Text),
            ("parent_id", Text),
            ("data", Blob),
            ("revision", Int),
            ("created_at", Int),
        ],
        order: "created_at, rowid",
    },
    Table {
        name: "agents",
        cols: &[
            ("spiffe_id", Text),
            ("attestor", Text),
            ("serial", Text),
            ("prev_serial", Text),
            ("expires_at", Int),
            ("banned", Bool),
            ("aliases", TextList),
            ("attested_at", Int),
        ],
        order: "rowid",
    },
    Table {
        name: "bundles",
        cols: &[
            ("trust_domain", Text),
            ("federated", Bool),
            ("data", Blob),
            ("updated_at", Int),
        ],
        order: "rowid",
    },
    Table {
        name: "join_tokens",
        cols: &[
            ("token_hash", Text),
            ("token_id", Text),
            ("alias_id", Text),
            ("expires_at", Int),
            ("created_at", Int),
        ],
        order: "rowid",
    },
    Table {
        name: "ca_journal",
        cols: &[
            ("id", Text),
            ("kind", Text),
            ("owner", Text),
            ("state", Text),
            ("data", Blob),
            ("revision", Int),
        ],
        order: "rowid",
    },
    Table {
        name: "issued_certs",
        cols: &[
            ("serial", Text),
            ("spiffe_id", Text),
            ("entry_id", Text),
            ("agent_id", Text),
            ("not_after", Int),
            ("issued_at", Int),
            ("ca_id", Text),
        ],
        // Insertion order decides which certificate of a slot is the newest.
        order: "rowid",
    },
    Table {
        name: "audit_seals",
        cols: &[
            ("server_id", Text),
            ("seq", Int),
            ("hash", Text),
            ("sealed_at_ms", Int),
            ("reason", Text),
            ("public_key", Blob),
            ("signature", Blob),
        ],
        order: "server_id, seq",
    },
    Table {
        name: "revoked_certs",
        cols: &[
            ("serial", Text),
            ("spiffe_id", Text),
            ("not_after", Int),
            ("revoked_at", Int),
            ("reason", Int),
        ],
        order: "rowid",
    },
    Table {
        name: "plans",
        cols: &[
            ("id", Text),
            ("kind", Text),
            ("author", Text),
            ("created_at", Int),
            ("expires_at", Int),
            ("body", Text),
            ("applied_change", Text),
        ],
        order: "rowid",
    },
    Table {
        name: "plan_approvals",
        cols: &[("plan_id", Text), ("approver", Text), ("approved_at", Int)],
        order: "rowid",
    },
    Table {
        name: "changes",
        cols: &[
            ("id", Text),
            ("kind", Text),
            ("actor", Text),
            ("created_at", Int),
            ("counts", Text),
            ("undo_until", Int),
            ("undone_at", Int),
        ],
        order: "rowid",
    },
    Table {
        name: "recycle",
        cols: &[
            ("change_id", Text),
            ("item_kind", Text),
            ("item_id", Text),
            ("data", Blob),
            ("expires_at", Int),
        ],
        order: "rowid",
    },
];

/// Every `(table, column)` copied.
pub fn copied_columns() -> Vec<(&'static str, &'static str)> {
    TABLES
        .iter()
        .flat_map(|t| t.cols.iter().map(|c| (t.name, c.0)))
        .collect()
}
