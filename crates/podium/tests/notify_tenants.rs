//! Tenants attack `podium exec` with what they can really capture. A tenant who may create
//! ElectionGroups writes one with `spec.notify` that selects a pod of its own; that pod answers
//! whatever arrives and keeps the operator's `Authorization` header and message. The tenant then
//! replays the operator's genuine tokens, with any body it likes, against the pods of a victim
//! group running real `podium exec` processes:
//! - from another namespace, whose group and pod carry the victim's names (`web`, `web-1`);
//! - from another group in the victim's own namespace.
//!
//! The attacks are the two that worked before tokens were bound to their pod: a forged leader (a
//! `pending` message at the next epoch to win a nonce, then a `leader` message for an hour) sent
//! to a follower, and a wedge (a `follower` message at a huge epoch) sent to the leader. Every one
//! must be refused with 401 and no nonce, no command may start, and the victim's epochs must not
//! move: the next genuine failover runs at the next epoch. As a control, the same forged leader
//! with a token minted for the victim pod itself (what only a holder of the operator's own
//! credentials can get) is taken, so the harness can see an attack that works.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use podium::operator::{Operator, OperatorConfig};
use podium_core::notify::audience;
use podium_testkit::leader_process::{NOTIFY_PORT, OPERATOR_ACCOUNT, ProcessPods, Work};
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{bind_pod, create_node, set_pod_running_ready};
use podium_testkit::token_holder;
use podium_testkit::wait::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TTL_SECONDS: u64 = 4;

/// What a tenant's pod saw: each request's bearer token and body.
type Captured = Arc<Mutex<Vec<(String, Value)>>>;

/// A tenant's pod: created in `ns` with label `app=<app>`, Running and Ready on `ip`, where a
/// listener answers every role message 200 with an ack and keeps what came.
async fn tenant_pod(
    client: &kube::Client,
    ns: &str,
    name: &str,
    app: &str,
    ip: &str,
) -> (String, Captured) {
    let node = format!("node-{ns}");
    create_node(client, &node).await.expect("node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": { "containers": [{ "name": "app", "image": "app" }] },
    }))
    .unwrap();
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("tenant pod");
    bind_pod(client, ns, name, &node).await.expect("bind");
    let captured: Captured = Arc::default();
    let addr: SocketAddr = format!("{ip}:{NOTIFY_PORT}").parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("tenant listener");
    let keep = captured.clone();
    tokio::spawn(async move {
        // Bounded: the test ends long before this many requests.
        for n in 0..10_000u32 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let keep = keep.clone();
            tokio::spawn(async move {
                let Some((token, body)) = read_request(&mut socket).await else {
                    return;
                };
                let epoch = body["epoch"].as_u64().unwrap_or(0);
                keep.lock().unwrap().push((token, body));
                let ack = json!({
                    "nonce": format!("tenant-{n}"), "epoch": epoch,
                    "running": false, "accepted": true,
                })
                .to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{ack}",
                    ack.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    set_pod_running_ready(client, ns, name, ip)
        .await
        .expect("tenant pod ready");
    (created.metadata.uid.unwrap(), captured)
}

/// One HTTP request's bearer token and JSON body, read within 5 s.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<(String, Value)> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > 64 * 1024 {
                return None;
            }
            let text = String::from_utf8_lossy(&buf).to_string();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length {
                let token = head.lines().find_map(|l| {
                    l.strip_prefix("Authorization: Bearer ")
                        .or_else(|| l.strip_prefix("authorization: Bearer "))
                        .map(str::to_string)
                })?;
                return Some((token, serde_json::from_str(&body[..length]).ok()?));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// The `aud` claim of a JWT, unverified: what the operator minted the token for.
fn audiences(token: &str) -> Vec<String> {
    let payload = token.split('.').nth(1).unwrap_or_default();
    let claims: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    claims["aud"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// POSTs `body` to a victim pod's exec with `token`: (status, answer).
async fn send(url: &str, token: &str, body: &Value) -> (u16, String) {
    token_holder::post(url, token, &body.to_string())
        .await
        .expect("reach the victim's exec")
}

async fn epoch(client: &kube::Client, ns: &str, group: &str) -> u64 {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease = leases.get(group).await.expect("the group's Lease");
    lease
        .spec
        .and_then(|s| s.lease_transitions)
        .map_or(0, |t| t as u64)
}

fn group(name: &str, app: &str) -> podium::crd::ElectionGroup {
    common::notify_group(name, app, TTL_SECONDS, NOTIFY_PORT)
}

fn runs(pods: &ProcessPods) -> Vec<Work> {
    pods.runs().expect("the work log parses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_tokens_forge_and_wedge_nothing_in_another_group() {
    podium::telemetry::init(podium::telemetry::LogFormat::Text, "warn,podium=info");
    let testbed = Testbed::shared();
    testbed.install_crd().await.expect("install CRD");
    let client = testbed.client();
    let victim_ns = testbed.create_namespace("victim").await.expect("namespace");
    let tenant_ns = testbed.create_namespace("tenant").await.expect("namespace");
    let dir = tempfile::tempdir().unwrap();
    let mut pods = common::exec_pods(&victim_ns, "web", 3, dir.path()).await;
    // The tenants' pods: the same pod and group names in another namespace, and another group
    // in the victim's namespace. Outside ProcessPods' loopback subnets (127.100-249.x.x).
    let host = std::process::id() % 200 + 1;
    let (other_ns_uid, from_other_ns) = tenant_pod(
        &client,
        &tenant_ns,
        "web-1",
        "web",
        &format!("127.251.{host}.1"),
    )
    .await;
    let (_, from_other_group) = tenant_pod(
        &client,
        &victim_ns,
        "tenant-0",
        "tenant",
        &format!("127.251.{host}.2"),
    )
    .await;

    let operator = Operator::start(
        client.clone(),
        OperatorConfig {
            http_addr: None,
            // Every namespace: this test binary has its testbed to itself.
            watch_namespace: None,
            election: None,
            service_account: Some((victim_ns.clone(), OPERATOR_ACCOUNT.to_string())),
        },
    )
    .await
    .expect("operator");
    for (ns, name, app) in [
        (&victim_ns, "web", "web"),
        (&tenant_ns, "web", "web"),
        (&victim_ns, "tenant", "tenant"),
    ] {
        let groups: Api<podium::crd::ElectionGroup> = Api::namespaced(client.clone(), ns);
        groups
            .create(&PostParams::default(), &group(name, app))
            .await
            .expect("group");
    }

    let first = wait_for(
        Duration::from_secs(30),
        "the victim's leader command",
        || async { runs(&pods).into_iter().next() },
    )
    .await;
    let stolen = wait_for(
        Duration::from_secs(30),
        "both tenants to capture a token",
        || async {
            let a = from_other_ns.lock().unwrap().first().cloned()?;
            let b = from_other_group.lock().unwrap().first().cloned()?;
            Some([("another namespace", a), ("another group", b)])
        },
    )
    .await;
    // What the operator sends a tenant is minted for that tenant's pod alone.
    assert_eq!(
        audiences(&stolen[0].1.0),
        [audience(&tenant_ns, "web", &other_ns_uid)],
        "{:?}",
        stolen[0].1.1
    );
    for (from, (_, message)) in &stolen {
        println!("captured from {from}: {message}");
    }

    let leader = first.pod.clone();
    let follower = (0..3)
        .map(|i| format!("web-{i}"))
        .find(|p| *p != leader)
        .unwrap();
    let uid = |name: &str| pods.pods[name].uid.clone();
    let before = epoch(&client, &victim_ns, "web").await;
    let victim_group = format!("{victim_ns}/web");
    let message = |pod: &str, role: &str, epoch: u64, nonce: Option<&str>, term: u64| {
        json!({
            "group": victim_group, "pod": pod, "podUid": uid(pod), "role": role,
            "leader": pod, "epoch": epoch, "termMillis": term, "nonce": nonce,
        })
    };
    let mut refused = BTreeMap::new();
    for (from, (token, _)) in &stolen {
        let attacks = [
            (
                "forged pending",
                &follower,
                message(&follower, "pending", before + 1, None, 3_600_000),
            ),
            (
                "forged leader",
                &follower,
                message(&follower, "leader", before + 1, Some("tenant-0"), 3_600_000),
            ),
            (
                "wedge at 2^53",
                &leader,
                message(&leader, "follower", 1 << 53, None, 3_600_000),
            ),
            (
                "wedge at the next epoch",
                &leader,
                message(&leader, "follower", before + 1, None, 3_600_000),
            ),
        ];
        for (attack, target, body) in attacks {
            let (status, answer) = send(&pods.url(target).unwrap(), token, &body).await;
            println!("{attack} from {from} at {target}: {status} {answer}");
            assert_eq!(status, 401, "{attack} from {from}: {answer}");
            assert!(!answer.contains("nonce"), "{attack} from {from}: {answer}");
            *refused.entry(status).or_insert(0) += 1;
        }
    }
    println!("refusals by status: {refused:?}");

    // For a whole term and more, nothing moved: the leader's command runs, no other started.
    tokio::time::sleep(Duration::from_secs(TTL_SECONDS + 1)).await;
    let after = runs(&pods);
    assert_eq!(after.len(), 1, "a command started or restarted: {after:?}");
    assert_eq!(
        (after[0].pod.as_str(), after[0].stop_ns),
        (leader.as_str(), None),
        "the leader's command stopped: {after:?}"
    );
    assert_eq!(epoch(&client, &victim_ns, "web").await, before);

    // Control: the same forged pending message with a token minted for the follower itself,
    // which only a holder of the operator's own credentials can get, is taken.
    let own = pods.operator_token(&follower).await.expect("a token");
    let (status, answer) = send(
        &pods.url(&follower).unwrap(),
        &own,
        &message(&follower, "pending", before + 1, None, 3_600_000),
    )
    .await;
    println!("control, the follower's own token: {status} {answer}");
    assert_eq!(status, 200, "{answer}");

    // The victim's epochs did not move: a genuine failover runs at the next epoch.
    pods.delete(&leader).await.expect("delete the leader");
    let next = wait_for(
        Duration::from_secs(30),
        "the next leader's command",
        || async { runs(&pods).into_iter().find(|r| r.pod != leader) },
    )
    .await;
    println!(
        "after the attacks, the failover went to {} at epoch {} (was {before})",
        next.pod, next.epoch
    );
    assert_eq!(next.epoch, before + 1);
    operator.stop().await;
}
