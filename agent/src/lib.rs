//! meshid agent: node attestation, workload attestation, SVID minting and
//! rotation, and the standard SPIFFE Workload API.

mod agent;
pub mod attest;
mod attest_cache;
mod cache;
pub mod cli;
mod clock;
pub mod config;
mod identity_store;
mod jwt;
mod jwt_svids;
pub mod k8s_attestor;
mod metrics;
mod node_api;
mod peer;
mod run;
mod sds;
mod workload_api;
