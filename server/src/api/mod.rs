//! The server's two APIs: the node API (agents, mTLS over TCP) and the admin
//! API (operators, a local Unix socket).

pub mod admin;
pub mod admin_ca;
pub mod admin_safe_ops;
pub mod node;
pub mod node_trust;
pub mod status;
pub mod tls;
