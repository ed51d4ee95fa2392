//! Compiles the protos with the `protoc` that ships inside `protoc-bin-vendored`, so a machine with only
//! cargo can build raftkv.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("raftkv_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                PathBuf::from("proto/raftkv/v1/kv.proto"),
                PathBuf::from("proto/raftkv/internal/v1/raft.proto"),
            ],
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
