//! SPIFFE identity helpers shared by meshid's server, agent and sidecar.
//!
//! - [`crypto`]: the one place that picks the TLS crypto provider and versions.
//! - [`spiffe_id`]: the canonical-form checks every SPIFFE ID and trust
//!   domain passes where it enters meshid.
//! - [`svid`]: reading SPIFFE IDs and validity out of X.509 certificates.
//! - [`verify`]: rustls verifiers that check the chain against the bundle of
//!   the peer's trust domain, then authorize the peer's SPIFFE ID.
//! - [`pem`]: PEM encoding and decoding of certificates and keys.
//! - [`h2_authority`]: accept any HTTP/2 `:authority` on Unix-socket gRPC servers.
//! - [`hpack_strings`]: table-driven HPACK Huffman decoding for it.
//! - [`files`]: atomic, durable writes of key and certificate files.

pub mod chain;
pub mod config_file;
pub mod crl;
pub mod crypto;
pub mod files;
pub mod h2_authority;
pub mod hpack_strings;
pub mod kube;
pub mod pem;
pub mod shutdown;
pub mod spiffe_id;
pub mod svid;
pub mod verify;

pub use spiffe::{SpiffeId, TrustDomain};
pub use svid::{SvidError, SvidInfo};
pub use verify::{Authorizer, TrustBundles};
