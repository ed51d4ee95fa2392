//! raftkv: a Raft-replicated key-value store.
//!
//! openraft does consensus; this crate is the storage (sled), the network (tonic) and the public gRPC
//! API around it, and the command line that runs a node or talks to one.
//!
//! # Layout
//!
//! From the process down; a module uses only those below it (and the shared pieces at the end).
//!
//! - `main.rs`, [`cli`]: the `raftkv` command: run a node, or talk to a cluster as a client.
//! - [`server`]: one node as a process: listeners, every gRPC service mounted, signals, shutdown.
//! - [`config`]: the server's flags, turned into each layer's settings.
//! - [`api`]: the public gRPC services (`raftkv.v1.KV`, `Cluster`, health, reflection), request
//!   validation, and the one table from failures to gRPC statuses ([`api::status`]).
//! - [`backup`]: backups taken while the cluster serves (a stream, or the leader's scheduled files)
//!   and new clusters restored from them.
//! - [`node`]: the node's core: where a write goes, linearizable reads, forwarding to the leader, the
//!   vote hold, and the errors a caller acts on ([`node::Error`]).
//! - [`network`]: openraft's transport between nodes (tonic on the peer port) and who a peer is
//!   ([`network::identity`]).
//! - [`store`]: durable storage on sled: the Raft log and vote, the state machine, snapshots, integrity
//!   checks.
//! - [`listener`], [`tls`]: bounded accepting and TLS for both ports.
//! - [`telemetry`]: Prometheus metrics and the `/livez` and `/readyz` endpoints (`--metrics-listen`);
//!   every layer records through the `metrics` facade under the names in [`telemetry::names`].
//! - Shared by all: [`types`] (the model: commands, results, members), [`limits`] (what a request may
//!   hold), [`codec`] (the bytes on disk and between nodes), [`grpc`] (deadlines), [`sync`], [`pb`].
//!
//! openraft's types appear only in `node`, `network`, `store`, `types` and `config` (its settings).

pub mod api;
pub mod backup;
pub mod cli;
pub mod codec;
pub mod config;
pub mod grpc;
pub mod limits;
pub mod listener;
pub mod network;
pub mod node;
pub mod pb;
pub mod server;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod types;
