//! `[store]`: SQLite or PostgreSQL, and how to reach it.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// `[store]`: where the registry lives.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// Embedded SQLite (default). `path` defaults to `<data_dir>/meshid.db`.
    Sqlite {
        /// Database file.
        path: Option<PathBuf>,
    },
    /// PostgreSQL, shared by several servers.
    ///
    /// ```toml
    /// [store]
    /// kind = "postgres"
    /// url = "postgres://meshid@db.example.org/meshid"  # password: PGPASSWORD or ~/.pgpass
    /// pool_size = 10
    /// ssl_mode = "verify-full"                          # default: as the URL says, else prefer
    /// ssl_root_cert = "/etc/meshid/db-ca.pem"           # default: the Mozilla roots
    /// ```
    Postgres {
        /// Connection URL, e.g. `postgres://user@host/meshid`.
        url: DatabaseUrl,
        /// Largest number of pooled connections.
        #[serde(default = "default_pool_size")]
        pool_size: u32,
        /// `disable`, `allow`, `prefer`, `require`, `verify-ca` or
        /// `verify-full`; overrides the URL's `sslmode`.
        ssl_mode: Option<crate::store::SslMode>,
        /// PEM roots the database's certificate must chain to.
        ssl_root_cert: Option<PathBuf>,
    },
}

/// A database URL; its `Debug` hides it, as it may carry a password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

fn default_pool_size() -> u32 {
    10
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let Self::Postgres {
            url,
            pool_size,
            ssl_mode,
            ssl_root_cert,
        } = self
        else {
            return Ok(());
        };
        if !(url.0.starts_with("postgres://") || url.0.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid(
                "store.url must start with postgres:// or postgresql://".into(),
            ));
        }
        if !(1..=1000).contains(pool_size) {
            return Err(ConfigError::Invalid(format!(
                "store.pool_size must be 1 to 1000, got {pool_size}"
            )));
        }
        if ssl_root_cert.is_some() && *ssl_mode == Some(crate::store::SslMode::Disable) {
            return Err(ConfigError::Invalid(
                "store.ssl_root_cert is set but store.ssl_mode = \"disable\"".into(),
            ));
        }
        Ok(())
    }

    /// Connection options of a PostgreSQL store; `None` for SQLite.
    pub fn postgres_options(&self) -> Option<crate::store::PostgresOptions> {
        match self {
            Self::Sqlite { .. } => None,
            Self::Postgres {
                url,
                pool_size,
                ssl_mode,
                ssl_root_cert,
            } => Some(crate::store::PostgresOptions {
                url: url.0.clone(),
                pool_size: *pool_size,
                ssl_mode: *ssl_mode,
                ssl_root_cert: ssl_root_cert.clone(),
            }),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Sqlite { path: None }
    }
}
