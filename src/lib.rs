//! Podium: leader election as a service for Kubernetes pods.
//!
//! Module map (see docs/design.md):
//! - [`crd`]: the `ElectionGroup` API types, the single source of truth for the CRD.
//! - [`testbed`]: a real local control plane (etcd, kube-apiserver, kube-controller-manager)
//!   and a simulated kubelet, shared by the tests, the demo and the benchmarks.
pub mod crd;
pub mod testbed;
pub mod election;
pub mod selector;
pub mod validate;
