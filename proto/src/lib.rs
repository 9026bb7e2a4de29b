//! meshid wire contracts, generated at build time from `proto/` with protox
//! (no system `protoc`).
//!
//! - [`workload`]: the standard SPIFFE Workload API (no proto package, so the
//!   gRPC paths are `/SpiffeWorkloadAPI/...`).
//! - [`types`]: messages shared by the node and admin APIs.
//! - [`node`]: agent ↔ server.
//! - [`admin`]: operator ↔ server.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The standard SPIFFE Workload API.
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Generated modules, nested as the proto packages are.
pub mod meshid {
    /// `meshid.types.*`
    pub mod types {
        /// `meshid.types.v1`
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshid.types.v1.rs"));
        }
    }
    /// `meshid.node.*`
    pub mod node {
        /// `meshid.node.v1`
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshid.node.v1.rs"));
        }
    }
    /// `meshid.admin.*`
    pub mod admin {
        /// `meshid.admin.v1`
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshid.admin.v1.rs"));
        }
    }
}

/// The encoded `FileDescriptorSet` of the Workload API (with its imports),
/// for gRPC reflection on the agent's socket (Workload Endpoint §7).
pub const WORKLOAD_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/workload_descriptor_set.bin"));

pub use meshid::admin::v1 as admin;
pub use meshid::node::v1 as node;
pub use meshid::types::v1 as types;
