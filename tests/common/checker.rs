//! The watch-based history checker: records every pod, Lease and EndpointSlice event of one
//! group's namespace while a test runs, and checks Podium's safety invariants over the whole
//! history, not just the end state.
//!
//! - I1: at no observed resourceVersion do two pods carry `podium.dev/role=leader`.
//! - I2: the epoch (`leaseTransitions`) never decreases, and it changes exactly when the holder does.
//! - I3: after quiet, the labelled leader equals the Lease holder and is eligible.
//! - I5: the leader Service's EndpointSlices never list two pods.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use podium::crd::ROLE_LABEL;
use podium::testbed::kubelet::endpointslice_resource;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub enum Record {
    /// A pod's role label as of one event (`None` when deleted or unlabelled).
    Pod {
        at: Instant,
        pod: String,
        role: Option<String>,
        ready: bool,
        terminating: bool,
    },
    Lease {
        at: Instant,
        holder: Option<String>,
        transitions: i32,
    },
    Slice {
        at: Instant,
        slice: String,
        addresses: Vec<String>,
    },
}

#[derive(Default)]
struct History {
    records: Vec<Record>,
    violations: Vec<String>,
    roles: BTreeMap<String, Option<String>>,
    slices: BTreeMap<String, Vec<String>>,
    last_lease: Option<(Option<String>, i32)>,
}

pub struct Checker {
    history: Arc<Mutex<History>>,
    tasks: Vec<JoinHandle<()>>,
    lease_name: String,
}

impl Checker {
    /// Starts watching `namespace`: pods, the Lease `group`, and the EndpointSlices of `service`.
    pub async fn start(
        client: &Client,
        namespace: &str,
        group: &str,
        service: Option<&str>,
    ) -> Checker {
        let history = Arc::new(Mutex::new(History::default()));
        let mut tasks = Vec::new();

        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let h = history.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = watcher(pods, watcher::Config::default()).boxed();
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { continue };
                let mut h = h.lock().unwrap();
                match event {
                    Event::Apply(p) | Event::InitApply(p) => h.pod(&p, false),
                    Event::Delete(p) => h.pod(&p, true),
                    Event::Init | Event::InitDone => {}
                }
            }
        }));

        let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
        let h = history.clone();
        let lease_name = group.to_string();
        let watched = lease_name.clone();
        tasks.push(tokio::spawn(async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={watched}"));
            let mut stream = watcher(leases, config).boxed();
            while let Some(event) = stream.next().await {
                if let Ok(Event::Apply(l) | Event::InitApply(l)) = event {
                    h.lock().unwrap().lease(&l);
                }
            }
        }));

        if let Some(service) = service {
            let slices: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &endpointslice_resource());
            let h = history.clone();
            let config =
                watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
            tasks.push(tokio::spawn(async move {
                let mut stream = watcher(slices, config).boxed();
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(Event::Apply(s) | Event::InitApply(s)) => {
                            h.lock().unwrap().slice(&s, false)
                        }
                        Ok(Event::Delete(s)) => h.lock().unwrap().slice(&s, true),
                        _ => {}
                    }
                }
            }));
        }
        // Let the watches list before the test starts acting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Checker {
            history,
            tasks,
            lease_name,
        }
    }

    pub fn records(&self) -> Vec<Record> {
        self.history.lock().unwrap().records.clone()
    }

    /// The first time at or after `since` that `pod` was seen labelled leader.
    pub fn leader_seen_at(&self, pod: &str, since: Instant) -> Option<Instant> {
        self.records().into_iter().find_map(|r| match r {
            Record::Pod {
                at, pod: p, role, ..
            } if at >= since && p == pod && role.as_deref() == Some("leader") => Some(at),
            _ => None,
        })
    }

    /// The first time at or after `since` that the slices listed exactly `address`.
    pub fn slice_only_seen_at(&self, address: &str, since: Instant) -> Option<Instant> {
        let mut current: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in self.records() {
            if let Record::Slice {
                at,
                slice,
                addresses,
            } = r
            {
                current.insert(slice, addresses);
                let all: Vec<&String> = current.values().flatten().collect();
                if at >= since && all.len() == 1 && all[0] == address {
                    return Some(at);
                }
            }
        }
        None
    }

    /// Panics with every invariant violation seen (I1, I2, I5) and checks I3 against `client`.
    pub async fn assert_invariants(&self, client: &Client, namespace: &str) {
        let violations = self.history.lock().unwrap().violations.clone();
        assert!(
            violations.is_empty(),
            "invariant violations:\n{}",
            violations.join("\n")
        );
        assert_converged(client, namespace, &self.lease_name).await;
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl History {
    fn pod(&mut self, p: &Pod, deleted: bool) {
        let name = p.name_any();
        let role = if deleted {
            None
        } else {
            p.labels().get(ROLE_LABEL).cloned()
        };
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        self.records.push(Record::Pod {
            at: Instant::now(),
            pod: name.clone(),
            role: role.clone(),
            ready,
            terminating: p.metadata.deletion_timestamp.is_some(),
        });
        self.roles.insert(name, role);
        let leaders: Vec<&String> = self
            .roles
            .iter()
            .filter(|(_, r)| r.as_deref() == Some("leader"))
            .map(|(n, _)| n)
            .collect();
        if leaders.len() > 1 {
            let msg = format!(
                "I1: two leader labels at pod resourceVersion {:?}: {leaders:?}",
                p.resource_version()
            );
            self.violations.push(msg);
        }
    }

    fn lease(&mut self, l: &Lease) {
        let spec = l.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions.unwrap_or(0);
        self.records.push(Record::Lease {
            at: Instant::now(),
            holder: holder.clone(),
            transitions,
        });
        if let Some((prev_holder, prev_transitions)) = &self.last_lease {
            if transitions < *prev_transitions {
                self.violations.push(format!(
                    "I2: epoch went backwards {prev_transitions} -> {transitions}"
                ));
            }
            let holder_changed = prev_holder != &holder;
            let epoch_changed = transitions != *prev_transitions;
            // Both may change in one step or neither; a watch never skips a write on one object
            // except across a relist, where several holder changes fold into one observation.
            if holder_changed && !epoch_changed {
                self.violations.push(format!("I2: holder {prev_holder:?} -> {holder:?} without an epoch change ({transitions})"));
            }
            if epoch_changed && !holder_changed && transitions == prev_transitions + 1 {
                self.violations.push(format!(
                    "I2: epoch {prev_transitions} -> {transitions} with the same holder {holder:?}"
                ));
            }
        }
        self.last_lease = Some((holder, transitions));
    }

    fn slice(&mut self, s: &DynamicObject, deleted: bool) {
        let addresses: Vec<String> = if deleted {
            Vec::new()
        } else {
            s.data
                .get("endpoints")
                .and_then(|e| e.as_array())
                .map(|eps| {
                    eps.iter()
                        .flat_map(|e| {
                            e.get("addresses")
                                .and_then(|a| a.as_array())
                                .cloned()
                                .unwrap_or_default()
                        })
                        .filter_map(|a| a.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let name = s.name_any();
        self.records.push(Record::Slice {
            at: Instant::now(),
            slice: name.clone(),
            addresses: addresses.clone(),
        });
        self.slices.insert(name, addresses);
        let all: Vec<&String> = self.slices.values().flatten().collect();
        if all.len() > 1 {
            self.violations.push(format!(
                "I5: the leader Service's EndpointSlices list {} addresses: {all:?}",
                all.len()
            ));
        }
    }
}

/// I3: the labelled leader equals the Lease holder and is eligible (Ready, not terminating),
/// polled for up to 5 s so the last writes can land.
pub async fn assert_converged(client: &Client, namespace: &str, lease_name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let problem = convergence_problem(client, namespace, lease_name).await;
        match problem {
            None => return,
            Some(p) if Instant::now() > deadline => panic!("I3: not converged after quiet: {p}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn convergence_problem(client: &Client, namespace: &str, lease_name: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let pods = pods.list(&Default::default()).await.ok()?;
    let leaders: Vec<&Pod> = pods
        .items
        .iter()
        .filter(|p| p.labels().get(ROLE_LABEL).map(String::as_str) == Some("leader"))
        .collect();
    let holder = leases
        .get_opt(lease_name)
        .await
        .ok()?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty());
    let names: Vec<String> = leaders.iter().map(|p| p.name_any()).collect();
    if names.len() > 1 {
        return Some(format!("several leader labels: {names:?}"));
    }
    if names.first() != holder.as_ref() {
        return Some(format!(
            "labelled leader {names:?} but Lease holder {holder:?}"
        ));
    }
    if let Some(p) = leaders.first() {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready || p.metadata.deletion_timestamp.is_some() {
            return Some(format!("leader {} is not eligible", p.name_any()));
        }
    }
    None
}
