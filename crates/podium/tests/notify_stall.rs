//! A member that stalls its group is named, not silently waited on. The operator never lowers an
//! epoch at a pod nor raises the group's on a pod's word, so a pod that holds an epoch above its
//! group's refuses every genuine message until its process restarts: the operator must say which
//! pod, why, and that deleting it clears it (a `NotificationsStalled` condition, a Warning Event,
//! `podium_notify_stalled_pods`), and stop saying so once it is gone.
//!
//! Both ways there on the testbed, with real `podium exec` pods and the real operator:
//! - a holder of the operator's own credentials mints a genuine token for the leader pod
//!   (TokenRequest, that pod's audience) and tells it `follower` at epoch 1000;
//! - the group is deleted and created again under the same name after failovers raised its
//!   epoch, while its pods run on: the new Lease counts from the start.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use podium::crd::ElectionGroup;
use podium::operator::{Operator, OperatorConfig};
use podium_testkit::leader_process::{OPERATOR_ACCOUNT, ProcessPods, Work};
use podium_testkit::testbed::Testbed;
use podium_testkit::token_holder;
use podium_testkit::wait::wait_for;
use serde_json::{Value, json};

const TTL_SECONDS: u64 = 4;
const STALLED: &str = "NotificationsStalled";

async fn start_operator(client: kube::Client, ns: &str) -> Operator {
    podium::telemetry::init(podium::telemetry::LogFormat::Text, "warn,podium=info");
    let config = OperatorConfig {
        http_addr: None,
        watch_namespace: Some(ns.to_string()),
        election: None,
        service_account: Some((ns.to_string(), OPERATOR_ACCOUNT.to_string())),
    };
    Operator::start(client, config)
        .await
        .expect("start operator")
}

fn group() -> ElectionGroup {
    common::notify_group("web", "web", TTL_SECONDS, 8787)
}

/// Pods `web-0`..`web-{n-1}` running `podium exec`, the operator, and the group.
async fn setup(name: &str, n: usize, dir: &Path) -> (String, ProcessPods, Operator) {
    let testbed = Testbed::shared();
    testbed.install_crd().await.expect("install CRD");
    let ns = testbed.create_namespace(name).await.expect("namespace");
    let client = testbed.client();
    let pods = common::exec_pods(&ns, "web", n, dir).await;
    let operator = start_operator(client.clone(), &ns).await;
    let groups: Api<ElectionGroup> = Api::namespaced(client, &ns);
    groups
        .create(&PostParams::default(), &group())
        .await
        .expect("create group");
    (ns, pods, operator)
}

fn runs(pods: &ProcessPods) -> Vec<Work> {
    pods.runs().expect("the work log parses")
}

/// Waits for a leader run after the first `after` runs, on a pod other than `not`.
async fn next_run(pods: &ProcessPods, after: usize, not: Option<&str>) -> Work {
    wait_for(
        Duration::from_secs(30),
        "a leader process to start",
        || async {
            runs(pods)
                .into_iter()
                .skip(after)
                .find(|r| Some(r.pod.as_str()) != not)
        },
    )
    .await
}

async fn stalled_condition(client: &kube::Client, ns: &str) -> Option<Condition> {
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), ns);
    groups
        .get_opt("web")
        .await
        .expect("read the group")?
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == STALLED)
}

/// Waits for the condition with `status` and `reason`; returns it and how long that took.
async fn wait_condition(
    client: &kube::Client,
    ns: &str,
    status: &str,
    reason: &str,
    timeout: Duration,
) -> (Condition, Duration) {
    let started = Instant::now();
    let condition = wait_for(
        timeout,
        &format!("{STALLED}={status} ({reason})"),
        || async {
            stalled_condition(client, ns)
                .await
                .filter(|c| c.status == status && c.reason == reason)
        },
    )
    .await;
    (condition, started.elapsed())
}

async fn stall_events(client: &kube::Client, ns: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .expect("listing events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(STALLED))
        .collect()
}

/// The gauge's line for `reason` in the operator's metrics.
fn gauge(operator: &Operator, ns: &str, reason: &str) -> Option<String> {
    let needle = format!(
        "podium_notify_stalled_pods{{namespace=\"{ns}\",group=\"web\",reason=\"{reason}\"}} "
    );
    operator
        .metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(&needle))
        .map(|l| l[needle.len()..].to_string())
}

async fn lease_epoch(client: &kube::Client, ns: &str) -> Option<u64> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), ns);
    leases
        .get_opt("web")
        .await
        .expect("read the Lease")?
        .spec?
        .lease_transitions
        .map(|t| t as u64)
}

/// POSTs `body` to `url` with `token`, as a holder of the operator's credentials could.
async fn send(url: &str, token: &str, body: &Value) -> (u16, String) {
    token_holder::post(url, token, &body.to_string())
        .await
        .expect("reach the pod's exec")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_wedged_at_a_higher_epoch_is_named_until_its_pod_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, mut pods, operator) = setup("stall", 3, dir.path()).await;
    let client = Testbed::shared().client();

    let first = next_run(&pods, 0, None).await;
    let (follow, _) = wait_condition(
        &client,
        &ns,
        "False",
        "AllPodsFollow",
        Duration::from_secs(10),
    )
    .await;
    println!("before: {STALLED}={} {}", follow.status, follow.reason);
    assert_eq!(gauge(&operator, &ns, "epoch_ahead").as_deref(), Some("0"));

    // Whoever may mint tokens for the operator's ServiceAccount tells the leader `follower` at
    // epoch 1000 with a genuine token for that pod alone.
    let leader = first.pod.clone();
    let uid = pods.pods[&leader].uid.clone();
    let token = pods.operator_token(&leader).await.expect("a token");
    let message = json!({
        "group": format!("{ns}/web"), "pod": leader, "podUid": uid, "role": "follower",
        "leader": leader, "epoch": 1000, "termMillis": TTL_SECONDS * 1000,
    });
    let (status, answer) = send(&pods.url(&leader).unwrap(), &token, &message).await;
    println!("forged follower at epoch 1000 to {leader}: {status} {answer}");
    assert_eq!(status, 200, "{answer}");
    let group_epoch = lease_epoch(&client, &ns).await.expect("the group's epoch");
    assert_eq!(group_epoch, first.epoch);

    let (stalled, took) = wait_condition(
        &client,
        &ns,
        "True",
        "PodEpochAhead",
        Duration::from_secs(10),
    )
    .await;
    println!(
        "{STALLED}=True {} {took:?} after the forged message: {}",
        stalled.reason, stalled.message
    );
    for needle in [
        format!("pod {leader} holds epoch 1000, above the group's epoch {group_epoch}"),
        format!("delete the pod to clear it (kubectl delete pod {leader})"),
    ] {
        assert!(
            stalled.message.contains(&needle),
            "missing {needle:?} in {}",
            stalled.message
        );
    }
    let event = wait_for(Duration::from_secs(5), "the stall's Event", || async {
        stall_events(&client, &ns).await.into_iter().next()
    })
    .await;
    let note = event.note.clone().unwrap_or_default();
    println!("Event {:?} {STALLED}: {note}", event.type_);
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("web")
    );
    assert!(
        note.contains(&format!("pod {leader} holds epoch 1000")),
        "{note}"
    );
    assert!(
        note.contains(&format!("kubectl delete pod {leader} -n {ns}")),
        "{note}"
    );
    assert_eq!(gauge(&operator, &ns, "epoch_ahead").as_deref(), Some("1"));
    assert_eq!(
        gauge(&operator, &ns, "running_ungranted").as_deref(),
        Some("0")
    );

    // The wedge is real: the leader's command stopped and no command runs, though the pod
    // keeps the leader label and the Lease.
    let now = runs(&pods);
    assert!(
        now.iter().all(|r| r.stop_ns.is_some()),
        "a command runs under a wedged leader: {now:?}"
    );
    assert_eq!(now.len(), 1, "{now:?}");
    // Still one Event for the one stall, however many refusals followed.
    tokio::time::sleep(Duration::from_secs(TTL_SECONDS)).await;
    assert_eq!(stall_events(&client, &ns).await.len(), 1);

    // The remedy the message names.
    let count = runs(&pods).len();
    pods.delete(&leader).await.expect("delete the wedged pod");
    let (cleared, took) = wait_condition(
        &client,
        &ns,
        "False",
        "AllPodsFollow",
        Duration::from_secs(10),
    )
    .await;
    println!(
        "{STALLED}=False {} {took:?} after the delete",
        cleared.reason
    );
    assert_eq!(gauge(&operator, &ns, "epoch_ahead").as_deref(), Some("0"));
    let next = next_run(&pods, count, Some(&leader)).await;
    println!("then {} leads at epoch {}", next.pod, next.epoch);
    assert!(next.epoch > first.epoch);
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_again_under_its_name_names_the_pods_still_at_the_old_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, mut pods, operator) = setup("stall-again", 3, dir.path()).await;
    let client = Testbed::shared().client();
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), &ns);

    // Two failovers raise the epoch every member has taken.
    let first = next_run(&pods, 0, None).await;
    let count = runs(&pods).len();
    pods.delete(&first.pod).await.expect("delete the leader");
    let second = next_run(&pods, count, Some(&first.pod)).await;
    pods.start("web-3", "web").await.expect("replacement pod");
    let count = runs(&pods).len();
    pods.delete(&second.pod).await.expect("delete the leader");
    let third = next_run(&pods, count, Some(&second.pod)).await;
    let old_epoch = third.epoch;
    println!(
        "leaders {} -> {} -> {} (epoch {old_epoch})",
        first.pod, second.pod, third.pod
    );
    let survivors: Vec<String> = pods
        .pods
        .values()
        .filter(|p| p.pid().is_some())
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(survivors.len(), 2, "{survivors:?}");

    // Delete the group; its pods run on and are told `follower` at the old epoch.
    groups
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete the group");
    wait_for(Duration::from_secs(20), "the group to go", || async {
        groups
            .get_opt("web")
            .await
            .expect("read the group")
            .is_none()
            .then_some(())
    })
    .await;
    // Long enough for the notifier to be told they stopped and to forget the group.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = runs(&pods).len();
    groups
        .create(&PostParams::default(), &group())
        .await
        .expect("create the group again");

    let (stalled, took) = wait_condition(
        &client,
        &ns,
        "True",
        "PodEpochAhead",
        Duration::from_secs(15),
    )
    .await;
    let new_epoch = lease_epoch(&client, &ns).await.expect("the new Lease");
    println!(
        "created again at epoch {new_epoch}: {STALLED}=True {took:?} after: {}",
        stalled.message
    );
    assert!(new_epoch < old_epoch);
    for pod in &survivors {
        assert!(
            stalled.message.contains(&format!(
                "pod {pod} holds epoch {old_epoch}, above the group's epoch {new_epoch}"
            )),
            "{pod} not named in {}",
            stalled.message
        );
    }
    assert_eq!(
        gauge(&operator, &ns, "epoch_ahead"),
        Some(survivors.len().to_string())
    );
    // It really wedges: a term and more later, no command has started.
    tokio::time::sleep(Duration::from_secs(TTL_SECONDS + 1)).await;
    let after = runs(&pods);
    assert_eq!(after.len(), count, "a command started: {after:?}");

    // Delete every stalled pod and start a fresh one: the condition clears, and the group leads.
    for pod in &survivors {
        pods.delete(pod).await.expect("delete a stalled pod");
    }
    pods.start("web-4", "web").await.expect("fresh pod");
    let (cleared, took) = wait_condition(
        &client,
        &ns,
        "False",
        "AllPodsFollow",
        Duration::from_secs(15),
    )
    .await;
    println!(
        "{STALLED}=False {} {took:?} after the deletes",
        cleared.reason
    );
    let fresh = next_run(&pods, count, None).await;
    println!("then {} leads at epoch {}", fresh.pod, fresh.epoch);
    assert_eq!(fresh.pod, "web-4");
    operator.stop().await;
}

/// A pod that is not `podium exec`: it takes every message and says its leader-only work runs
/// at the message's epoch, whatever it was told. Serves until the test ends.
async fn liar(ip: &str) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind((ip, podium_testkit::leader_process::NOTIFY_PORT))
        .await
        .expect("the liar listens");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // One request per connection, at most 64 KiB: enough for a role message.
                while request.len() < 64 * 1024 {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    let message: Value = serde_json::from_str(body).unwrap_or_default();
                    let epoch = message["epoch"].as_u64().unwrap_or(0);
                    let ack = json!({
                        "nonce": format!("liar-{}", request.len()),
                        "epoch": epoch, "running": true, "accepted": true,
                    })
                    .to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ack}",
                        ack.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    return;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_claiming_a_term_it_was_never_granted_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (ns, members, operator) = setup("stall-liar", 2, dir.path()).await;
    let client = Testbed::shared().client();
    let first = next_run(&members, 0, None).await;

    // A member joins that says it runs leader-only work at every epoch it hears of, though
    // nobody granted it a term: more than a term after the operator started sending.
    let ip = format!("127.253.{}.1", std::process::id() % 250);
    let _server = liar(&ip).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let pod = serde_json::from_value(json!({
        "metadata": { "name": "liar", "labels": { "app": "web" } },
        "spec": { "containers": [{ "name": "app", "image": "app" }] },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the liar's pod");
    use podium_testkit::testbed::kubelet::{bind_pod, finalize_deletion, set_pod_running_ready};
    bind_pod(&client, &ns, "liar", &format!("node-{ns}"))
        .await
        .expect("bind");
    set_pod_running_ready(&client, &ns, "liar", &ip)
        .await
        .expect("ready");

    let (stalled, took) = wait_condition(
        &client,
        &ns,
        "True",
        "PodRunningUngranted",
        Duration::from_secs(10),
    )
    .await;
    println!(
        "{STALLED}=True {} {took:?} after the liar was Ready: {}",
        stalled.reason, stalled.message
    );
    let needle = format!(
        "pod liar says it runs leader-only work at epoch {}, which this operator never granted it",
        first.epoch
    );
    assert!(
        stalled.message.contains(&needle),
        "missing {needle:?} in {}",
        stalled.message
    );
    assert!(!stalled.message.contains(&first.pod), "{}", stalled.message);
    assert_eq!(
        gauge(&operator, &ns, "running_ungranted").as_deref(),
        Some("1")
    );
    assert_eq!(gauge(&operator, &ns, "epoch_ahead").as_deref(), Some("0"));
    let event = wait_for(Duration::from_secs(5), "the stall's Event", || async {
        stall_events(&client, &ns).await.into_iter().next()
    })
    .await;
    let note = event.note.unwrap_or_default();
    println!("Event {STALLED}: {note}");
    assert!(note.contains("pod liar says it runs"), "{note}");

    pods.delete("liar", &DeleteParams::default())
        .await
        .expect("delete the liar");
    finalize_deletion(&client, &ns, "liar")
        .await
        .expect("finalize");
    let (cleared, took) = wait_condition(
        &client,
        &ns,
        "False",
        "AllPodsFollow",
        Duration::from_secs(10),
    )
    .await;
    println!(
        "{STALLED}=False {} {took:?} after the delete",
        cleared.reason
    );
    assert_eq!(
        gauge(&operator, &ns, "running_ungranted").as_deref(),
        Some("0")
    );
    operator.stop().await;
}
