//! meshid agent: node attestation, workload attestation, SVID minting and
//! rotation, and the standard SPIFFE Workload API.

pub mod agent;
pub mod attest;
pub mod cache;
pub mod cli;
pub mod config;
pub mod jwt;
pub mod k8s_attestor;
pub mod metrics;
pub mod peer;
pub mod run;
pub mod sds;
pub mod server_client;
pub mod workload_api;
