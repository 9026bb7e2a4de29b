//! Node attestors: single-use join tokens, and Kubernetes projected
//! service-account tokens reviewed by the cluster's API server.

pub mod join_token;
pub mod k8s_psat;
