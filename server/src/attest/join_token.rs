//! Join tokens: single use, short TTL. Only a SHA-256 of the token is stored.

use std::time::{Duration, SystemTime};

use aws_lc_rs::digest::{SHA256, digest};

use crate::state::ServerState;
use crate::store::{JoinTokenRecord, StoreError};
use meshid_identity::svid::unix;

/// Attestor name on the wire.
pub const ATTESTOR: &str = "join_token";

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Unknown or already used.
    #[error("join token is invalid or has already been used")]
    Invalid,
    /// Past its TTL.
    #[error("join token expired at {0}")]
    Expired(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TokenError {
    /// Metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Invalid => "invalid_token",
            Self::Expired(_) => "expired_token",
            Self::Store(_) => "error",
        }
    }
}

fn hash(token: &[u8]) -> String {
    hex::encode(digest(&SHA256, token))
}

/// The agent SPIFFE ID for a token id.
pub fn agent_id(td_id: &str, token_id: &str) -> String {
    meshid_identity::spiffe_id::agent_id(td_id, ATTESTOR, &[token_id])
}

/// Creates and stores a token; returns the token and its record.
pub async fn create(
    st: &ServerState,
    ttl: Duration,
    alias_id: &str,
) -> Result<(String, JoinTokenRecord), StoreError> {
    let token = hex::encode(rand::random::<[u8; 20]>());
    let token_hash = hash(token.as_bytes());
    let now = SystemTime::now();
    let rec = JoinTokenRecord {
        token_id: token_hash[..16].to_string(),
        token_hash,
        alias_id: alias_id.to_string(),
        expires_at: unix(now + ttl),
        created_at: unix(now),
    };
    st.store.create_join_token(&rec).await?;
    Ok((token, rec))
}

/// Consumes a token: valid once, before its expiry.
pub async fn redeem(st: &ServerState, token: &[u8]) -> Result<JoinTokenRecord, TokenError> {
    let rec = st
        .store
        .consume_join_token(&hash(token))
        .await?
        .ok_or(TokenError::Invalid)?;
    if rec.expires_at <= unix(SystemTime::now()) {
        return Err(TokenError::Expired(rec.expires_at.to_string()));
    }
    Ok(rec)
}
