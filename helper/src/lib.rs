//! `meshid helper`: SVIDs, keys, bundles and JWT-SVIDs as files, for
//! applications that only read files, kept fresh from the SPIFFE Workload
//! API; the application is signalled (or started) after each renewal.
//!
//! - [`config`]: TOML, or spiffe-helper's HCL with the same keys.
//! - [`render`]: what goes into each file (PEM, combined PEM, PKCS#12).
//! - [`publish`]: the whole set switched with one rename.
//! - [`run`]: the Workload API loops and the notification of the application.

pub mod cli;
mod config;
mod publish;
mod render;
mod run;
