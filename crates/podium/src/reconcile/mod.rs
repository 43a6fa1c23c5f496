//! Reconcile one ElectionGroup, in typed steps:
//!
//! 1. [`observe`]: read the group, its pods and its Lease from the caches into the core's
//!    [`Observation`](crate::election::Observation);
//! 2. decide: [`election::decide`], pure;
//! 3. [`apply`]: send the decision's writes in the protocol's order (Lease, then labels
//!    break-before-make), each conditional on what was read;
//! 4. [`report`]: status by server-side apply, Events and metrics.
//!
//! A deleted group goes through [`cleanup`] instead.

mod apply;
mod cleanup;
mod observe;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;

use crate::crd::{ElectionGroup, FINALIZER};
use crate::election;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::lean_lease::LeanLease;
use crate::memory::{Key, Memory};
use crate::metrics::Metrics;
use crate::pod::ElectionPod;
use crate::validate;
use podium_core::renewal::Holding;

/// How soon a reconcile that found its claim lapsed looks again.
const CLAIM_RETRY: Duration = Duration::from_millis(200);

/// How often a group whose holder the renewer keeps is decided again with no event to prompt
/// it: a safety net for a missed event, not the renewal cadence.
const RESYNC: Duration = Duration::from_secs(60);

/// What every reconcile shares: the client, the watch caches, the memory, and the reporting
/// sinks.
pub struct Context {
    pub client: Client,
    pub groups: Store<ElectionGroup>,
    pub pods: Store<ElectionPod>,
    pub pod_index: Arc<Index<ElectionPod>>,
    pub group_index: Arc<Index<ElectionGroup>>,
    /// `None` when the operator may not read Nodes (namespace-scoped RBAC).
    pub nodes: Option<Store<Node>>,
    pub leases: Store<Lease>,
    pub events: crate::events::Events,
    pub notifier: crate::notify::Notifier,
    pub metrics: Arc<Metrics>,
    /// Whether this replica holds the operator Lease; only the holder writes.
    pub leading: watch::Receiver<bool>,
    /// Until when it holds it: checked just before each batch of writes.
    pub claim: watch::Receiver<crate::ha::Claim>,
    /// Whether every cache has had its first full list.
    pub synced: Arc<AtomicBool>,
    pub memory: Arc<Memory>,
    pub renewer: crate::renewer::Renewer,
}

pub async fn reconcile(group: Arc<ElectionGroup>, ctx: Arc<Context>) -> Result<Action> {
    if !*ctx.leading.borrow() {
        // A standby keeps its caches warm; the trigger fired on gaining leadership brings it here again.
        return Ok(Action::await_change());
    }
    if !ctx.synced.load(Ordering::Acquire) {
        // The group cache can fill before the pod cache: deciding now would see no members and
        // fail a healthy leader over (observed on every restart that lost that race).
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let started = Instant::now();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let api: Api<ElectionGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(group) = unless_cleaned_up(&api, group).await? else {
        ctx.metrics.reconciled(started.elapsed());
        return Ok(Action::await_change());
    };
    let result = match add_finalizer(&api, group).await {
        Ok(group) => {
            finalizer(&api, FINALIZER, group, |event| async {
                match event {
                    FinalizerEvent::Apply(g) => elect(&g, &ctx).await,
                    FinalizerEvent::Cleanup(g) => cleanup::cleanup(&g, &ctx).await,
                }
            })
            .await
        }
        Err(e) => Err(e),
    };
    ctx.metrics.reconciled(started.elapsed());
    match result {
        // Two reconciles of a deleted group can race to remove the finalizer; the second finds
        // the group already gone, which is the outcome both wanted.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(e))
            if crate::error::status_code(&e) == Some(404) =>
        {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

/// A deleting group as the server has it now, or `None` once its cleanup has finished. The
/// cleanup's own pod writes queue one more reconcile, which can start from a cache that still
/// shows the group with its finalizer after the finalizer is gone; run from that copy, a second
/// cleanup would fence the old leader again after the group had gone (seen as a flaky
/// `deleting_a_group_removes_every_label_and_the_lease`), or fence a new group of the same
/// name. Reconciles of one group never overlap, and only a cleanup removes the finalizer, so
/// what this read shows still holds when the cleanup starts.
async fn unless_cleaned_up(
    api: &Api<ElectionGroup>,
    group: Arc<ElectionGroup>,
) -> Result<Option<Arc<ElectionGroup>>> {
    if group.meta().deletion_timestamp.is_none() {
        return Ok(Some(group));
    }
    let fresh = api
        .get_opt(&group.name_any())
        .await
        .map_err(Error::GroupRead)?;
    Ok(fresh
        .filter(|g| g.uid() == group.uid() && g.finalizers().iter().any(|f| f == FINALIZER))
        .map(Arc::new))
}

/// Adds podium's finalizer to a live group that lacks it, and goes on with the group the server
/// returned. kube's `finalizer` helper adds it too, but then ends the reconcile and waits for the
/// patched group's watch event: a new group was elected one API round trip and one queue pass
/// later than it needed to be. The patch is conditional on the resourceVersion read, as the
/// helper's JSON-patch test is.
async fn add_finalizer(
    api: &Api<ElectionGroup>,
    group: Arc<ElectionGroup>,
) -> Result<Arc<ElectionGroup>, kube::runtime::finalizer::Error<Error>> {
    if group.meta().deletion_timestamp.is_some()
        || group.finalizers().iter().any(|f| f == FINALIZER)
    {
        return Ok(group);
    }
    let mut finalizers = group.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": group.resource_version(),
        }
    });
    api.patch(
        &group.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(Arc::new)
    .map_err(kube::runtime::finalizer::Error::AddFinalizer)
}

pub fn error_policy(group: Arc<ElectionGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.kind());
    let ttl = group.spec.lease_duration_seconds.clamp(2, 3600);
    if error.is_conflict() {
        tracing::debug!(group = %group.name_any(), %error, "conflict; retrying from fresh state");
        return Action::requeue(Duration::from_millis(50));
    }
    tracing::warn!(group = %group.name_any(), kind = error.kind(), %error, "reconcile failed");
    // Retry well inside the renewal window so one failed renewal does not cost the Lease.
    Action::requeue(election::renew_interval(ttl).min(Duration::from_secs(1)) / 2)
}

/// One live group: observe, decide, apply, report.
async fn elect(cached: &ElectionGroup, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    let seen_at = Instant::now();
    let name = cached.name_any();
    let namespace = cached.namespace().ok_or(Error::MissingObjectKey)?;
    let key = (namespace.clone(), name.clone());
    let ours = ctx.memory.status_newer_than(&key, Some(cached));
    let group = ours.as_deref().unwrap_or(cached);
    let previous = group.status.as_ref();

    let switchover = observe::switchover_request(group);
    if let Err(problems) = validate::validate(&group.spec) {
        let mut status =
            election::status::invalid(previous, &problems, group.metadata.generation, now);
        // A switchover asked for meanwhile is answered, not left waiting for a valid spec.
        let refused = match &switchover {
            Some(Ok(request)) => Some(election::SwitchoverDecision::refused(
                request,
                previous.and_then(|p| p.leader.as_deref()),
                "the group's spec is invalid (see the InvalidSpec condition); fix it first".into(),
            )),
            _ => None,
        };
        if let Some(refused) = &refused {
            status.last_switchover = Some(election::status::switchover_outcome(
                refused,
                status.epoch.unwrap_or_default(),
                now,
            ));
        }
        if election::status::differs(previous, &status) {
            report::event(
                ctx,
                group,
                EventType::Warning,
                "InvalidSpec",
                problems.join("; "),
            );
            report::write_status(ctx, group, &status).await?;
        }
        if let Some(refused) = &refused {
            report::switchover_done(ctx, group, refused);
        }
        ctx.renewer.release(&key);
        return Ok(Action::await_change());
    }

    let lease_api: Api<LeanLease> = Api::namespaced(ctx.client.clone(), &namespace);
    let read_lease = observe::read_lease(ctx, &lease_api, &key).await?;
    let observed = observe::observe(
        group,
        &switchover,
        ctx,
        read_lease.as_deref(),
        &namespace,
        now,
    );
    let mut decision = election::decide(&observed);
    if let Some(Err(problem)) = &switchover {
        decision.warnings.push(problem.clone());
    }
    apply::defer_routine_writes(&observed, &mut decision);

    if !ctx.claim.borrow().is_current() {
        // Deciding took us past our claim on the operator Lease: another replica may act now.
        // Look again soon: a late renewal restores the claim without any other trigger.
        return Ok(Action::requeue(CLAIM_RETRY));
    }
    let result = apply::apply(
        group,
        ctx,
        &lease_api,
        read_lease.as_deref(),
        &decision,
        seen_at,
        now,
    )
    .await;
    if let Err(e) = &result {
        ctx.renewer.release(&key);
        match e {
            Error::LeaseWrite { source, .. } => ctx
                .memory
                .lease_write_failed(&key, crate::error::status_code(source) == Some(409)),
            Error::LeaseMoved(_) => ctx.memory.lease_write_failed(&key, false),
            _ => {}
        }
        if e.is_forbidden() {
            report::forbidden(ctx, group, &observed, &decision, e, now).await;
        }
    }
    let failover_took = result?;
    let requeue = keep_renewing(ctx, key, &decision);
    // The pods hear of the labels just written before the status write, which they do not
    // need: that write's round trip would delay every handover of the application's work.
    report::notify(ctx, group, &observed, &decision);
    report::decided(ctx, group, &observed, &decision, failover_took, now).await?;
    Ok(Action::requeue(requeue))
}

/// Hands a kept holder's renewals to the renewer (or takes them back when nobody leads), and
/// says when to decide again: at the decision's own deadline or the resync, since the renewer
/// sends the renewals in between.
fn keep_renewing(ctx: &Context, key: Key, decision: &election::Decision) -> Duration {
    match (&decision.leader, decision.renew_after) {
        (Some(holder), Some(after)) => {
            let holding = Holding {
                holder: holder.clone(),
                epoch: decision.epoch,
            };
            ctx.renewer.hold(key, holding, after);
            decision.wake_after.map_or(RESYNC, |wake| wake.min(RESYNC))
        }
        _ => {
            ctx.renewer.release(&key);
            decision.requeue_after
        }
    }
}
