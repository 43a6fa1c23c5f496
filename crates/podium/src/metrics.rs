//! Prometheus metrics, served as text on `/metrics`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::client_metrics::ClientMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub namespace: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenewalLabels {
    /// `renewed`, `failed` (the write was refused or got no answer), or `handed_back` (not sent:
    /// the group needed a decision).
    pub result: &'static str,
}

/// The results [`Metrics::renewal`] counts.
pub const RENEWAL_RESULTS: [&str; 3] = ["renewed", "failed", "handed_back"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifyLabels {
    /// `accepted`, `refused`, or why the send failed (`timeout`, `unreachable`, ...).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StalledLabels {
    pub namespace: String,
    pub group: String,
    /// One of [`STALL_REASONS`].
    pub reason: &'static str,
}

/// Why a pod stalls its group, as [`Metrics::notify_stalled`] labels it: its epoch is above the
/// group's, or it says it runs leader-only work at an epoch this replica never granted.
pub const STALL_REASONS: [&str; 2] = ["epoch_ahead", "running_ungranted"];

pub struct Metrics {
    registry: Registry,
    leader_changes: Family<GroupLabels, Counter>,
    leaders: Family<GroupLabels, Gauge>,
    failover_seconds: Histogram,
    reconcile_seconds: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    renewals: Family<RenewalLabels, Counter>,
    groups: Gauge,
    groups_without_leader: Gauge,
    is_operator_leader: Gauge,
    client: ClientMetrics,
    notifications: Family<NotifyLabels, Counter>,
    notify_seconds: Histogram,
    notify_waits: Family<NamespaceLabels, Counter>,
    activation_wait_seconds: Histogram,
    notify_stalled_pods: Family<StalledLabels, Gauge>,
    /// Whether each known group has a leader; the two group gauges are derived from it.
    led: Mutex<HashMap<GroupLabels, bool>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("podium");
        let leader_changes = Family::<GroupLabels, Counter>::default();
        registry.register(
            "leader_changes",
            "Changes of Lease holder per group",
            leader_changes.clone(),
        );
        let leaders = Family::<GroupLabels, Gauge>::default();
        registry.register("leaders", "Pods carrying podium.dev/role=leader per group, after the last reconcile (alert if > 1)", leaders.clone());
        // 1 ms .. ~16 s: a loopback failover takes milliseconds, a stuck one seconds.
        let failover_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "failover_seconds",
            "From the moment the old leader was seen ineligible to the new leader label being acknowledged",
            failover_seconds.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        registry.register(
            "reconcile_seconds",
            "Duration of one reconcile of one group",
            reconcile_seconds.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        for kind in crate::error::Error::KINDS {
            let _ = reconcile_errors.get_or_create(&ErrorLabels {
                kind: (*kind).into(),
            });
        }
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error kind",
            reconcile_errors.clone(),
        );
        let renewals = Family::<RenewalLabels, Counter>::default();
        for result in RENEWAL_RESULTS {
            let _ = renewals.get_or_create(&RenewalLabels { result });
        }
        registry.register(
            "renewals",
            "Routine Lease renewals the renewer sent outside a reconcile, by result: renewed, failed, or handed_back to a reconcile unsent",
            renewals.clone(),
        );
        let groups = Gauge::default();
        registry.register(
            "groups",
            "ElectionGroups this operator manages",
            groups.clone(),
        );
        let groups_without_leader = Gauge::default();
        registry.register(
            "groups_without_leader",
            "ElectionGroups with no leader right now",
            groups_without_leader.clone(),
        );
        let is_operator_leader = Gauge::default();
        registry.register(
            "is_operator_leader",
            "1 when this replica holds the operator Lease and reconciles",
            is_operator_leader.clone(),
        );
        let client = ClientMetrics::register(registry.sub_registry_with_prefix("kube_client"));
        let notifications = Family::<NotifyLabels, Counter>::default();
        for result in ["accepted", "refused"] {
            let _ = notifications.get_or_create(&NotifyLabels {
                result: result.into(),
            });
        }
        registry.register(
            "notifications",
            "Role notifications sent to pods, by result: accepted, refused (stale), or the failure",
            notifications.clone(),
        );
        let notify_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "notification_seconds",
            "From sending a role notification to the pod's answer (a demotion is answered once the pod's command stopped)",
            notify_seconds.clone(),
        );
        let notify_waits = Family::<NamespaceLabels, Counter>::default();
        registry.register(
            "notification_waits",
            "Times a group's due role notifications had to wait for a free send slot (its namespace's share, or the pool, was in use), by namespace",
            notify_waits.clone(),
        );
        let activation_wait_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register(
            "activation_wait_seconds",
            "How long a new leader waited, told pending, until no other pod could still run leader-only work",
            activation_wait_seconds.clone(),
        );
        let notify_stalled_pods = Family::<StalledLabels, Gauge>::default();
        registry.register(
            "notify_stalled_pods",
            "Members of a group with spec.notify that stall it until their pod is deleted, by reason: epoch_ahead (refuses every notification) or running_ungranted (says it runs leader-only work this replica never granted)",
            notify_stalled_pods.clone(),
        );
        Metrics {
            registry,
            leader_changes,
            leaders,
            failover_seconds,
            reconcile_seconds,
            reconcile_errors,
            renewals,
            groups,
            groups_without_leader,
            is_operator_leader,
            client,
            notifications,
            notify_seconds,
            notify_waits,
            activation_wait_seconds,
            notify_stalled_pods,
            led: Mutex::new(HashMap::new()),
        }
    }

    /// The kube client's request metrics; its layer records into this registry.
    pub fn client_requests(&self) -> &ClientMetrics {
        &self.client
    }

    pub fn leader_changed(&self, namespace: &str, group: &str) {
        self.leader_changes
            .get_or_create(&labels(namespace, group))
            .inc();
    }

    pub fn failover(&self, took: Duration) {
        self.failover_seconds.observe(took.as_secs_f64());
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// One routine renewal's result, one of [`RENEWAL_RESULTS`].
    pub fn renewal(&self, result: &'static str) {
        self.renewals.get_or_create(&RenewalLabels { result }).inc();
    }

    pub fn reconcile_error(&self, kind: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { kind: kind.into() })
            .inc();
    }

    pub fn notify_sent(&self, result: &str, took: Duration) {
        self.notifications
            .get_or_create(&NotifyLabels {
                result: result.into(),
            })
            .inc();
        self.notify_seconds.observe(took.as_secs_f64());
    }

    /// A group in `namespace` started waiting for a send slot.
    pub fn notify_waited(&self, namespace: &str) {
        self.notify_waits
            .get_or_create(&NamespaceLabels {
                namespace: namespace.into(),
            })
            .inc();
    }

    pub fn notify_activated(&self, waited: Duration) {
        self.activation_wait_seconds.observe(waited.as_secs_f64());
    }

    /// How many of a notified group's members stall it, per reason, in the order of
    /// [`STALL_REASONS`].
    pub fn notify_stalled(&self, namespace: &str, group: &str, counts: [usize; 2]) {
        for (reason, count) in STALL_REASONS.into_iter().zip(counts) {
            self.notify_stalled_pods
                .get_or_create(&StalledLabels {
                    namespace: namespace.into(),
                    group: group.into(),
                    reason,
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// The group no longer asks for notifications, or this replica stopped sending them.
    pub fn notify_stalled_removed(&self, namespace: &str, group: &str) {
        for reason in STALL_REASONS {
            self.notify_stalled_pods.remove(&StalledLabels {
                namespace: namespace.into(),
                group: group.into(),
                reason,
            });
        }
    }

    pub fn operator_leader(&self, leading: bool) {
        self.is_operator_leader.set(i64::from(leading));
    }

    /// Records a group's state after a reconcile.
    pub fn group_state(
        &self,
        namespace: &str,
        group: &str,
        has_leader: bool,
        leader_labels: usize,
    ) {
        let key = labels(namespace, group);
        // From 0, so that `increase()` counts a group's first leader change too.
        let _ = self.leader_changes.get_or_create(&key);
        self.leaders
            .get_or_create(&key)
            .set(i64::try_from(leader_labels).unwrap_or(i64::MAX));
        let mut led = self
            .led
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = led.insert(key, has_leader);
        self.count_groups(before, Some(has_leader));
    }

    pub fn group_removed(&self, namespace: &str, group: &str) {
        let key = labels(namespace, group);
        self.leaders.remove(&key);
        self.leader_changes.remove(&key);
        let mut led = self
            .led
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = led.remove(&key);
        self.count_groups(before, None);
    }

    /// Moves the group counts by one group's change (`None`: not known / removed). Called with
    /// the `led` map locked, so the gauges move in the map's order. Recounting the whole map
    /// instead cost O(groups) on every renewal (seen in the bench's profile at 10,000 groups).
    fn count_groups(&self, before: Option<bool>, after: Option<bool>) {
        let known = |l: Option<bool>| i64::from(l.is_some());
        let leaderless = |l: Option<bool>| i64::from(l == Some(false));
        self.groups.inc_by(known(after) - known(before));
        self.groups_without_leader
            .inc_by(leaderless(after) - leaderless(before));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn labels(namespace: &str, group: &str) -> GroupLabels {
    GroupLabels {
        namespace: namespace.into(),
        group: group.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.leader_changed("ns", "web");
        m.failover(Duration::from_millis(12));
        m.reconcile_error("pod_patch");
        m.group_state("ns", "web", true, 1);
        m.group_state("ns", "db", false, 0);
        m.operator_leader(true);
        m.notify_sent("timeout", Duration::from_secs(15));
        m.notify_activated(Duration::from_millis(3));
        m.notify_waited("crowded");
        m.renewal("renewed");
        m.notify_stalled("ns", "web", [1, 0]);
        m.notify_stalled("ns", "gone", [0, 2]);
        m.notify_stalled_removed("ns", "gone");
        let text = m.encode();
        assert!(!text.contains("group=\"gone\""), "{text}");
        for needle in [
            "podium_leader_changes_total{namespace=\"ns\",group=\"web\"} 1",
            "podium_failover_seconds_count 1",
            "podium_reconcile_errors_total{kind=\"pod_patch\"} 1",
            "podium_reconcile_errors_total{kind=\"lease_write\"} 0",
            "podium_leader_changes_total{namespace=\"ns\",group=\"db\"} 0",
            "podium_groups 2",
            "podium_groups_without_leader 1",
            "podium_is_operator_leader 1",
            "podium_leaders{namespace=\"ns\",group=\"web\"} 1",
            "podium_notifications_total{result=\"accepted\"} 0",
            "podium_notifications_total{result=\"timeout\"} 1",
            "podium_notification_seconds_count 1",
            "podium_activation_wait_seconds_count 1",
            "podium_notification_waits_total{namespace=\"crowded\"} 1",
            "podium_renewals_total{result=\"renewed\"} 1",
            "podium_renewals_total{result=\"failed\"} 0",
            "podium_renewals_total{result=\"handed_back\"} 0",
            "podium_notify_stalled_pods{namespace=\"ns\",group=\"web\",reason=\"epoch_ahead\"} 1",
            "podium_notify_stalled_pods{namespace=\"ns\",group=\"web\",reason=\"running_ungranted\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        // The same group again, then elected: counted once, and no longer leaderless.
        m.group_state("ns", "db", false, 0);
        m.group_state("ns", "db", true, 1);
        let text = m.encode();
        assert!(text.contains("podium_groups 2"), "{text}");
        assert!(text.contains("podium_groups_without_leader 0"), "{text}");
        m.group_state("ns", "db", false, 0);
        m.group_removed("ns", "db");
        m.group_removed("ns", "never-seen");
        let text = m.encode();
        assert!(text.contains("podium_groups 1"), "{text}");
        assert!(text.contains("podium_groups_without_leader 0"), "{text}");
    }
}
