//! meshid server: the trust domain's CA, registry, node API and admin API.

mod admin_certs;
mod api;
mod attest;
pub mod audit;
pub mod bundle_format;
pub mod ca;
pub mod cli;
pub mod config;
pub mod issuance;
mod journal;
pub mod metrics;
mod run;
mod safe_ops;
mod signing_pool;
pub mod state;
pub mod store;
mod sync_view;
