//! The Podium operator. The decisions live in [`podium_core`]; this crate watches, reads the
//! caches, asks the core, and sends the writes (see docs/design.md).
//!
//! - [`reconcile`]: one group: observe, decide, apply the writes in order, report.
//! - [`controller`]: the watches and how their events map to groups.
//! - [`lease`], [`labels`], [`status`]: the conditional writes.
//! - [`notify`]: role notifications to the pods of groups with `spec.notify`.
//! - [`memory`]: what the operator remembers per group between reconciles.
//! - [`renewer`]: a kept holder's routine renewals, outside the reconcile.
//! - [`operator`], [`ha`], [`http`], [`metrics`], [`client_metrics`], [`telemetry`], [`cli`]:
//!   running it.
//! - [`ctl`]: `podium switchover` and `podium status` (also as `kubectl podium`).
//! - [`exec`]: `podium exec -- CMD`, run in a member pod: CMD runs only while the pod leads.
pub mod cli;
pub mod client_metrics;
pub mod controller;
pub mod ctl;
pub mod error;
pub mod events;
pub mod exec;
pub mod ha;
pub mod http;
pub mod index;
pub mod labels;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod operator;
pub mod reconcile;
pub mod renewer;
pub mod status;
pub mod telemetry;

pub use podium_core::{FIELD_MANAGER, crd, election, lean_lease, pod, selector, validate};
