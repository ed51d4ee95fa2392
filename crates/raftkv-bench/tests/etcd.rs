//! What the benchmark binary says when asked for etcd without the `etcd` feature.

use std::process::Command;

#[cfg(not(feature = "etcd"))]
#[test]
fn etcd_target_without_the_feature_says_how_to_get_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv-bench"))
        .args(["put", "--target", "etcd", "--endpoints", "127.0.0.1:1"])
        .output()
        .expect("run raftkv-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-p raftkv-bench --features etcd"), "{err}");
}
