//! Generated protobuf and gRPC code.

/// The public API, `raftkv.v1`, generated once by the client crate.
pub use raftkv_client::pb::v1;

/// Node-to-node traffic, `raftkv.internal.v1`.
pub mod internal {
    tonic::include_proto!("raftkv.internal.v1");
}

/// Every service's descriptors, for server reflection (grpcurl needs no .proto files).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("raftkv_descriptor");
