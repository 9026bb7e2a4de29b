//! How to reach the database: URL, pool size, TLS.

use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::store::StoreError;

/// TLS towards the database (the `sslmode` of libpq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Plain TCP, TLS if the server insists.
    Allow,
    /// TLS if the server offers it, plain otherwise (sqlx's default).
    Prefer,
    /// TLS, without verifying the server's certificate.
    Require,
    /// TLS; the server's certificate must chain to a trusted root.
    VerifyCa,
    /// TLS; as `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

impl From<SslMode> for PgSslMode {
    fn from(m: SslMode) -> Self {
        match m {
            SslMode::Disable => Self::Disable,
            SslMode::Allow => Self::Allow,
            SslMode::Prefer => Self::Prefer,
            SslMode::Require => Self::Require,
            SslMode::VerifyCa => Self::VerifyCa,
            SslMode::VerifyFull => Self::VerifyFull,
        }
    }
}

/// How to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// `postgres://user[:password]@host[:port]/database[?…]`. libpq's
    /// environment (`PGPASSWORD`, `PGSSLROOTCERT`, …) and `~/.pgpass` apply
    /// to what the URL leaves out.
    pub url: String,
    /// Largest number of pooled connections (the change listener has one
    /// more of its own).
    pub pool_size: u32,
    /// TLS mode; `None` keeps what the URL says (default `prefer`).
    pub ssl_mode: Option<SslMode>,
    /// PEM file of the roots that the database's certificate must chain to
    /// (default: the Mozilla roots compiled in).
    pub ssl_root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for PostgresOptions {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .finish()
    }
}

impl PostgresOptions {
    /// Options for `url` with the defaults (10 connections, TLS as the URL says).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 10,
            ssl_mode: None,
            ssl_root_cert: None,
        }
    }

    /// The sqlx connection options.
    pub fn connect_options(&self) -> Result<PgConnectOptions, StoreError> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(StoreError::Db(sqlx::Error::Configuration(
                "the URL must start with postgres:// or postgresql://".into(),
            )));
        }
        let mut o = PgConnectOptions::from_str(&self.url)?;
        if let Some(m) = self.ssl_mode {
            o = o.ssl_mode(m.into());
        }
        if let Some(p) = &self.ssl_root_cert {
            o = o.ssl_root_cert(p);
        }
        Ok(o)
    }
}
