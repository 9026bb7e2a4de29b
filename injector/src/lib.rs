//! `meshid injector`: a Kubernetes mutating admission webhook that adds the
//! meshid sidecar to pods, as a native sidecar (an init container with
//! `restartPolicy: Always`), together with the Workload API socket volume and
//! `SPIFFE_ENDPOINT_SOCKET`.
//!
//! The decision and the patch are a pure function of the AdmissionReview
//! ([`mutate`]); [`server`] is only the HTTPS transport around it.

pub mod annotations;
pub mod cli;
pub mod config;
pub mod mutate;
pub mod review;
pub mod server;
