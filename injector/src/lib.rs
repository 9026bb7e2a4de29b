//! `meshid injector`: a Kubernetes mutating admission webhook that adds the
//! meshid sidecar to pods, as a native sidecar (an init container with
//! `restartPolicy: Always`), together with the Workload API socket volume and
//! `SPIFFE_ENDPOINT_SOCKET`.
//!
//! The decision and the patch are a pure function of the AdmissionReview
//! ([`mutate`]); [`server`] is only the HTTPS transport around it.

mod annotations;
pub mod cli;
mod config;
mod mutate;
mod review;
mod server;
