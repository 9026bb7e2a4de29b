//! meshid server: the trust domain's CA, registry, node API and admin API.

pub mod admin_certs;
pub mod api;
pub mod attest;
pub mod audit;
pub mod bundle_format;
pub mod ca;
pub mod cli;
pub mod config;
pub mod issuance;
pub mod journal;
pub mod metrics;
pub mod run;
pub mod safe_ops;
pub mod signing_pool;
pub mod state;
pub mod store;
pub mod sync_view;
