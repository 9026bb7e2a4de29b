//! meshid sidecar.

pub mod cli;
