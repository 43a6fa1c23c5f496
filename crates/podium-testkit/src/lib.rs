//! Podium's test kit, shared by the integration tests, the bench and the demo, and never
//! compiled into the operator:
//!
//! - [`testbed`]: a real etcd, kube-apiserver and kube-controller-manager on loopback, and a
//!   simulated kubelet.
//! - [`fixture`]: a namespace, a Deployment of servers, a leader Service, a group, and waits.
//! - [`observe`]: watches of pods, Leases and EndpointSlices, timestamped as they arrive.
//! - [`checker`]: the safety invariants checked over the whole watch history of a test.
//! - [`faults`]: a client layer that injects failures into the operator's writes.
//! - [`counting`]: a client layer that counts (and can log) every request.
pub mod checker;
pub mod counting;
pub mod faults;
pub mod fixture;
pub mod observe;
pub mod testbed;

/// The repository's top directory, for tests that read the chart, the CRD or the scripts.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root above crates/podium-testkit")
}
