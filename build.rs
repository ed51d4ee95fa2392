//! Compiles the node-to-node proto, and the descriptors of every service for server reflection, with
//! the `protoc` that ships inside `protoc-bin-vendored`, so a machine with only cargo can build
//! raftkv. The public API's code is generated once, by the raftkv-client crate.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let public = PathBuf::from("proto/raftkv/v1/kv.proto");
    let internal = PathBuf::from("proto/raftkv/internal/v1/raft.proto");

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        std::slice::from_ref(&internal),
        &[PathBuf::from("proto"), well_known.clone()],
    )?;

    let descriptor = out_dir.join("raftkv_descriptor.bin");
    let status = std::process::Command::new(&protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", descriptor.display()))
        .arg("-Iproto")
        .arg(format!("-I{}", well_known.display()))
        .arg(&public)
        .arg(&internal)
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed to write the descriptor set: {status}").into());
    }
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
