//! raftkv: a Raft-replicated key-value store.
//!
//! openraft does consensus; this crate is the storage (sled), the network (tonic), the public gRPC API and
//! the tooling around them. Each box of the design is one module, so an openraft upgrade touches one module
//! per layer.

pub mod api;
pub mod cli;
pub mod codec;
pub mod config;
pub mod forward;
pub mod listener;
pub mod network;
pub mod node;
pub mod pb;
pub mod server;
pub mod store;
pub mod tls;
pub mod types;
