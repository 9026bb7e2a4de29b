//! Compiles the protos with protox (pure Rust), so no system `protoc` is needed.
//!
//! Maps are generated as `BTreeMap`s, so a message encodes to the same bytes
//! every time its content is the same (a `HashMap` would encode in a random
//! order): the agent compares encoded responses to skip re-sending an
//! unchanged one. The Workload API's file descriptor set is kept for gRPC
//! reflection on the agent's socket.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/spiffe/workload.proto",
        "proto/meshid/types.proto",
        "proto/meshid/node.proto",
        "proto/meshid/admin.proto",
        "proto/meshid/admin_x509.proto",
        "proto/meshid/admin_safe_ops.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // Reflection describes the Workload API only (and what it imports), not
    // the node and admin APIs, which are not served on that socket.
    let workload = protox::compile(["proto/spiffe/workload.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("workload_descriptor_set.bin"),
        workload.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
