//! The registry's storage: one [`Store`] with two implementations, an
//! embedded SQLite database (the default, one server) and PostgreSQL (shared
//! by several servers). [`Store`] is the sum of one trait per job
//! ([`EntryStore`], [`AgentStore`], [`BundleStore`], [`CaJournalStore`],
//! [`AuditSealStore`], [`SafeOpsStore`]), and each backend implements each in its own file.
//!
//! Entries and bundles are kept as the `meshid.types` messages of
//! `meshid-proto` (prost-encoded), so the store, the node API and the admin
//! API share one model and nothing is translated twice. Queries take domain
//! types ([`EntryFilter`]), never admin-API request types.
//!
//! Changes that agents must see (entries, bundles, an agent's identity-relevant
//! fields) bump a store-wide revision that [`Store::subscribe_changes`]
//! publishes: in-process for SQLite, across servers for PostgreSQL.

pub mod migrate;
pub mod postgres;
pub mod revocations;
pub mod safe_ops;
pub mod sqlite;

use async_trait::async_trait;
use meshid_proto::types::{Authority, Bundle, Entry, Selector};
use tokio::sync::watch;

pub use postgres::{PostgresOptions, PostgresStore, SslMode, StoreStats};
pub use revocations::RevokedCert;
pub use safe_ops::SafeOpsStore;
pub use sqlite::SqliteStore;

/// An entry as stored (prost-encoded); a row that does not decode is
/// `Corrupt`. Both backends read entries through this.
pub(crate) fn decode_entry(data: &[u8]) -> Result<Entry, StoreError> {
    use prost::Message as _;
    Entry::decode(data).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A bundle as stored (prost-encoded).
pub(crate) fn decode_bundle(data: &[u8]) -> Result<Bundle, StoreError> {
    use prost::Message as _;
    Bundle::decode(data).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// An entry's selectors as a sorted set: what makes two entries under one
/// parent duplicates.
pub(crate) fn sorted_selectors(e: &Entry) -> Vec<(String, String)> {
    let mut v: Vec<_> = e
        .selectors
        .iter()
        .map(|s| (s.r#type.clone(), s.value.clone()))
        .collect();
    v.sort();
    v
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The row does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A conflicting row exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// An optimistic-concurrency check failed.
    #[error("changed concurrently: {0}")]
    Conflict(String),
    /// The agent is banned: it may not attest again or renew.
    #[error("banned: {0}")]
    Banned(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Stored data does not decode.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the database could not be reached (connection refused or
    /// lost, no connection within the pool's timeout): the operation may
    /// succeed later, unlike a refused or failed statement.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Db(
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}

/// A join token as stored (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    /// Public id, used in the agent SPIFFE ID.
    pub token_id: String,
    /// Alias SPIFFE ID given at creation, or empty.
    pub alias_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub created_at: i64,
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID.
    pub spiffe_id: String,
    /// Attestor that admitted it.
    pub attestor: String,
    /// Serial of its current SVID.
    pub serial: String,
    /// Serial of the SVID before the last renewal (accepted until it expires).
    pub prev_serial: String,
    /// notAfter of the current SVID, Unix seconds.
    pub expires_at: i64,
    /// Banned agents are refused everything.
    pub banned: bool,
    /// Alias SPIFFE IDs the agent also holds.
    pub aliases: Vec<String>,
    /// Unix seconds.
    pub attested_at: i64,
}

impl AgentRecord {
    /// The IDs an entry's parent may name for this agent.
    pub fn parent_ids(&self) -> Vec<String> {
        let mut v = vec![self.spiffe_id.clone()];
        v.extend(self.aliases.iter().cloned());
        v
    }
}

/// Why a conditional renewal of `spiffe_id` (expecting `expected_serial`)
/// matched no row, given the row as it is now.
pub(crate) fn renew_refusal(
    spiffe_id: &str,
    expected_serial: &str,
    now: Option<AgentRecord>,
) -> StoreError {
    match now {
        None => StoreError::NotFound(format!("agent {spiffe_id}: evicted")),
        Some(a) if a.banned => StoreError::Banned(format!("agent {spiffe_id}")),
        Some(a) => StoreError::Conflict(format!(
            "agent {spiffe_id}: SVID serial {expected_serial} was superseded by {} meanwhile",
            a.serial
        )),
    }
}

/// One issued certificate, for the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Hex serial.
    pub serial: String,
    /// SPIFFE ID in the certificate.
    pub spiffe_id: String,
    /// Entry it was issued for (empty for agent SVIDs).
    pub entry_id: String,
    /// Agent that requested it.
    pub agent_id: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Id of the authority that signed it (see [`Authority`]).
    pub ca_id: String,
}

/// What one authority has signed, for the CA journal's views.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IssuedSummary {
    /// Authority id.
    pub ca_id: String,
    /// Live certificates (see [`CaJournalStore::live_issued_by`]).
    pub live: i64,
    /// Latest notAfter of anything it signed, Unix seconds.
    pub last_not_after: i64,
}

/// A sealed audit chain head: the server's signature over the sequence
/// number and hash of its last durable audit record (see `audit::seal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSeal {
    /// The chain's id (derived from the seal key): one chain per server.
    pub server_id: String,
    /// Sequence number of the sealed record.
    pub seq: i64,
    /// Hex SHA-256 of the sealed record.
    pub hash: String,
    /// When it was sealed, Unix milliseconds.
    pub sealed_at_ms: i64,
    /// `records`, `interval` or `shutdown`.
    pub reason: String,
    /// Raw Ed25519 public key of the seal key.
    pub public_key: Vec<u8>,
    /// Ed25519 signature over `audit::seal::message`.
    pub signature: Vec<u8>,
}

/// Registration entries. Every multi-row change is atomic.
#[async_trait]
pub trait EntryStore: Send + Sync + 'static {
    /// Creates an entry. Refuses a duplicate (same SPIFFE ID, parent and
    /// selector set).
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError>;
    /// One entry by id.
    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;
    /// Entries by ids (missing ids are skipped).
    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>, StoreError>;
    /// Entries matching a filter (empty filter: all), ordered by creation.
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError>;
    /// Entries whose parent is one of `parents`.
    async fn list_entries_by_parents(&self, parents: &[String]) -> Result<Vec<Entry>, StoreError>;
    /// Replaces an entry if its stored revision is `expected_revision`.
    async fn update_entry(&self, entry: &Entry, expected_revision: i64) -> Result<(), StoreError>;
    /// Deletes entries atomically; fails without deleting anything if one is
    /// missing.
    async fn delete_entries(&self, ids: &[String]) -> Result<(), StoreError>;
    /// Number of entries.
    async fn count_entries(&self) -> Result<i64, StoreError>;
}

/// Join tokens and attested agents. Every multi-row change is atomic.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    /// Stores a new join token.
    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;
    /// Atomically removes and returns a token: a token can be consumed once.
    async fn consume_join_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<JoinTokenRecord>, StoreError>;
    /// Records an attested agent: inserts it, or replaces an earlier
    /// attestation of the same ID (a re-attesting node), in one conditional
    /// statement that never replaces a banned agent: that is `Banned`, and
    /// nothing changes. `agent.banned` is not written (a new attestation is
    /// never banned); a ban is only ever set by [`AgentStore::ban_agent`].
    async fn attest_agent(&self, agent: &AgentRecord) -> Result<(), StoreError>;
    /// Records a renewed agent SVID: the current serial becomes the previous
    /// one, `serial` and `expires_at` become current. One conditional update
    /// of those three columns only, applied if the agent still exists
    /// (`NotFound`: evicted meanwhile, and it is not re-inserted), is not
    /// banned (`Banned`) and its current serial is still `expected_serial`
    /// (`Conflict`: renewed or re-attested meanwhile). Returns the agent as
    /// stored after the update.
    async fn renew_agent(
        &self,
        spiffe_id: &str,
        expected_serial: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<AgentRecord, StoreError>;
    /// Bans an agent: sets `banned` and nothing else, so it cannot undo a
    /// concurrent renewal, nor be undone by one. Returns the agent as stored.
    async fn ban_agent(&self, spiffe_id: &str) -> Result<AgentRecord, StoreError>;
    /// One agent.
    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// All agents.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Removes an agent (eviction).
    async fn delete_agent(&self, spiffe_id: &str) -> Result<(), StoreError>;
}

/// Trust bundles (own and federated). Every multi-row change is atomic.
#[async_trait]
pub trait BundleStore: Send + Sync + 'static {
    /// Inserts or replaces a bundle.
    async fn put_bundle(&self, bundle: &Bundle, federated: bool) -> Result<(), StoreError>;
    /// One bundle.
    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<Bundle>, StoreError>;
    /// Federated bundles.
    async fn list_federated_bundles(&self) -> Result<Vec<Bundle>, StoreError>;
    /// Removes a federated bundle.
    async fn delete_bundle(&self, trust_domain: &str) -> Result<(), StoreError>;
}

/// The CA journal: authorities, issued certificates and revocations. Every multi-row change is atomic.
#[async_trait]
pub trait CaJournalStore: Send + Sync + 'static {
    /// Every authority in the CA journal (all owners, all states).
    async fn list_authorities(&self) -> Result<Vec<Authority>, StoreError>;
    /// Adds an authority; refuses a duplicate id.
    async fn insert_authority(&self, authority: &Authority) -> Result<(), StoreError>;
    /// Replaces an authority if its stored revision is `expected_revision`
    /// (the caller sets `authority.revision` to the next one); `Conflict`
    /// otherwise, so two servers never both apply a transition.
    async fn update_authority(
        &self,
        authority: &Authority,
        expected_revision: i64,
    ) -> Result<(), StoreError> {
        self.update_authorities(&[(authority.clone(), expected_revision)])
            .await
    }
    /// Replaces several authorities at once, each only if its stored
    /// revision is the one given with it: all or none, in one transaction,
    /// so no reader ever sees a transition half done (e.g. the old CA
    /// retired and the new one not yet active).
    async fn update_authorities(&self, changes: &[(Authority, i64)]) -> Result<(), StoreError>;
    /// Live certificates signed by `ca_id` at `now`: not expired, and still
    /// the newest certificate of their (agent, entry, SPIFFE ID) slot, i.e.
    /// not since replaced by a renewal. At most `limit`.
    async fn live_issued_by(
        &self,
        ca_id: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<IssuedRecord>, StoreError>;
    /// Number of live certificates per authority at `now` (same meaning as
    /// [`CaJournalStore::live_issued_by`]) and the latest notAfter each signed, for
    /// authorities that signed anything still unexpired at `now` (others are
    /// absent).
    async fn issued_summary(&self, now: i64) -> Result<Vec<IssuedSummary>, StoreError>;
    /// Journals issued certificates (one transaction).
    async fn record_issued(&self, certs: &[IssuedRecord]) -> Result<(), StoreError>;
    /// Looks up a journaled certificate.
    async fn get_issued(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError>;
    /// Records a revocation; `false` (and nothing changes) if the serial is
    /// already revoked.
    async fn revoke_cert(&self, cert: &RevokedCert) -> Result<bool, StoreError>;
    /// Revoked certificates whose notAfter is not before `now`, oldest
    /// revocation first.
    async fn list_revoked(&self, now: i64) -> Result<Vec<RevokedCert>, StoreError>;
    /// Forgets certificates whose notAfter is before `before`: at most
    /// `limit` journaled certificates and at most `limit` revocations, each
    /// set in one statement. Returns how many rows went. Nothing live is
    /// touched: `before` is never later than now.
    async fn prune_expired(&self, before: i64, limit: i64) -> Result<u64, StoreError>;
}

/// Seals of the audit log's hash chain. Every multi-row change is atomic.
#[async_trait]
pub trait AuditSealStore: Send + Sync + 'static {
    /// Stores an audit seal; a second seal for the same (server, seq) is
    /// refused (`AlreadyExists`).
    async fn put_audit_seal(&self, seal: &AuditSeal) -> Result<(), StoreError>;
    /// Seals of one server's chain, by sequence number.
    async fn list_audit_seals(&self, server_id: &str) -> Result<Vec<AuditSeal>, StoreError>;
    /// The seal with the highest sequence number of one server's chain.
    async fn latest_audit_seal(&self, server_id: &str) -> Result<Option<AuditSeal>, StoreError>;
}

/// Everything the server persists: one store, five jobs. Callers hold an
/// `Arc<dyn Store>` and bring the parts they use into scope with
/// `use crate::store::prelude::*`.
pub trait Store:
    EntryStore
    + AgentStore
    + BundleStore
    + CaJournalStore
    + AuditSealStore
    + SafeOpsStore
    + Send
    + Sync
    + 'static
{
    /// The store's change revision: it grows whenever something agents must
    /// see changes (entries, bundles, a new agent, an agent's aliases or ban,
    /// an eviction), through this store or, for a shared database, through
    /// any other server's. Waiting on the receiver is how servers learn of
    /// each other's changes; the value itself only ever grows.
    fn subscribe_changes(&self) -> watch::Receiver<u64>;
}

/// The store's traits, for `use …::store::prelude::*`.
pub mod prelude {
    pub use super::{
        AgentStore as _, AuditSealStore as _, BundleStore as _, CaJournalStore as _,
        EntryStore as _, SafeOpsStore as _, Store,
    };
}

/// Which entries a query selects. Fields are ANDed; unset fields match
/// everything, so the default filter selects every entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries with this parent ID.
    pub parent_id: Option<String>,
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only entries carrying every one of these selectors.
    pub selectors: Vec<Selector>,
}

impl EntryFilter {
    /// Whether `entry` satisfies the filter.
    pub fn matches(&self, entry: &Entry) -> bool {
        self.parent_id
            .as_ref()
            .is_none_or(|p| &entry.parent_id == p)
            && self
                .spiffe_id
                .as_ref()
                .is_none_or(|s| &entry.spiffe_id == s)
            && self.selectors.iter().all(|s| entry.selectors.contains(s))
    }

    /// Whether the filter selects every entry.
    pub fn is_empty(&self) -> bool {
        self.parent_id.is_none() && self.spiffe_id.is_none() && self.selectors.is_empty()
    }
}
