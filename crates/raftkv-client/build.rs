//! Generates the public API (`raftkv.v1`) with the `protoc` inside `protoc-bin-vendored`, so a machine
//! with only cargo can build it. The server stubs only with the `server` feature: a client never
//! serves the API.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("raftkv/v1/kv.proto");

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .compile_with_config(config, std::slice::from_ref(&proto), &[root, well_known])?;
    println!("cargo:rerun-if-changed={}", proto.display());
    Ok(())
}
