//! Node attestors. Join tokens today; x509pop and Kubernetes PSAT are further
//! implementations of the same flow.

pub mod join_token;
