//! Fault-test machinery. The linearizability checker comes first; the nemesis, workloads and the
//! `raftkv jepsen` driver build on it.

pub mod checker;
