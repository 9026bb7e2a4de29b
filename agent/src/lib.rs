//! meshid agent: node attestation, workload attestation, SVID minting and
//! rotation, and the standard SPIFFE Workload API.

pub mod agent;
pub mod attest;
pub mod attest_cache;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod identity_store;
pub mod jwt;
pub mod jwt_svids;
pub mod k8s_attestor;
pub mod metrics;
pub mod node_api;
pub mod peer;
pub mod run;
pub mod sds;
pub mod workload_api;
