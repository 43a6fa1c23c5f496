//! One tenant's pods that accept connections and never answer must not starve another
//! tenant's renewals. In namespace A, 300 pods in ten notify groups point at loopback listeners
//! that take every connection and never answer; in namespace B, a group of real `podium exec`
//! pods runs its leader's command under a 4 s term. While A's pods hang for three terms, B's
//! leader must stay told `leader`: its command never stops, and its term never runs out.
//!
//! Before the notifier shared its sends among namespaces, A held all 256 of them for 15 s at
//! a time and B's leader's command stopped when its term ran out.
//!
//! Its own test binary: the operator watches every namespace of this binary's testbed.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use podium::operator::{Operator, OperatorConfig};
use podium_core::notify::fair::Caps;
use podium_testkit::leader_process::{NOTIFY_PORT, OPERATOR_ACCOUNT};
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{bind_pod, create_node, set_pod_running_ready};
use podium_testkit::wait::wait_for;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TTL_SECONDS: u64 = 4;
const HANGING_PODS: usize = 300;
const HANGING_GROUPS: usize = 10;
/// How long A's pods hang while B is watched: three terms.
const FLOOD: Duration = Duration::from_secs(3 * TTL_SECONDS);
/// The listeners let go of everything after this, whatever happens to the test.
const HOLD: Duration = Duration::from_secs(90);

/// A's pods: one listener per loopback IP, all on one port, that accept and never answer.
struct Hanging {
    ips: Vec<String>,
    port: u16,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    most_open: Arc<AtomicUsize>,
    reached: Arc<Vec<AtomicBool>>,
}

impl Hanging {
    /// Binds `count` listeners on 127.<250 + pid % 5>.x.y, on a port the kernel picks for the
    /// first, so that runs at once on this machine do not collide.
    async fn start(count: usize) -> Hanging {
        let subnet = 250 + std::process::id() % 5;
        let ips: Vec<String> = (0..count)
            .map(|i| format!("127.{subnet}.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let mut listeners = Vec::new();
        'attempt: for _ in 0..5 {
            listeners.clear();
            let first = TcpListener::bind((ips[0].as_str(), 0))
                .await
                .expect("bind a loopback listener");
            let port = first.local_addr().unwrap().port();
            listeners.push(first);
            for ip in &ips[1..] {
                let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
                match TcpListener::bind(addr).await {
                    Ok(listener) => listeners.push(listener),
                    Err(_) => continue 'attempt,
                }
            }
            break;
        }
        assert_eq!(listeners.len(), count, "could not bind {count} listeners");
        let port = listeners[0].local_addr().unwrap().port();
        let hanging = Hanging {
            ips,
            port,
            accepted: Arc::default(),
            open: Arc::default(),
            most_open: Arc::default(),
            reached: Arc::new((0..count).map(|_| AtomicBool::new(false)).collect()),
        };
        let until = tokio::time::Instant::now() + HOLD;
        for (index, listener) in listeners.into_iter().enumerate() {
            let accepted = hanging.accepted.clone();
            let open = hanging.open.clone();
            let most_open = hanging.most_open.clone();
            let reached = hanging.reached.clone();
            tokio::spawn(tokio::time::timeout_at(until, async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    reached[index].store(true, Ordering::Relaxed);
                    let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
                    most_open.fetch_max(now_open, Ordering::Relaxed);
                    let open = open.clone();
                    // Reads whatever comes and answers nothing, until the operator gives up
                    // and closes the connection.
                    tokio::spawn(async move {
                        let mut sink = [0u8; 4096];
                        let _ = tokio::time::timeout_at(until, async {
                            while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                        })
                        .await;
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }));
        }
        hanging
    }

    fn reached(&self) -> usize {
        self.reached
            .iter()
            .filter(|r| r.load(Ordering::Relaxed))
            .count()
    }
}

/// Creates A's pods, `hang-<i>` labelled `app=hang-<i % HANGING_GROUPS>`, Running and Ready
/// on the listeners' IPs.
async fn hanging_pods(client: &kube::Client, ns: &str, ips: &[String]) {
    let node = format!("node-{ns}");
    create_node(client, &node).await.expect("node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let created: Vec<anyhow::Result<()>> = futures::stream::iter(ips.iter().enumerate())
        .map(|(i, ip)| {
            let (pods, node) = (pods.clone(), node.clone());
            async move {
                let name = format!("hang-{i}");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {
                        "name": name,
                        "labels": { "app": format!("hang-{}", i % HANGING_GROUPS) },
                    },
                    "spec": { "containers": [{ "name": "app", "image": "app" }] },
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                bind_pod(client, ns, &name, &node).await?;
                set_pod_running_ready(client, ns, &name, ip).await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for result in created {
        result.expect("a hanging pod");
    }
}

fn group(name: &str, app: &str, port: u16) -> podium::crd::ElectionGroup {
    common::notify_group(name, app, TTL_SECONDS, port)
}

/// `podium exec`'s full `/role` view: `role`, `running`, `termRemainingMillis`, ...
async fn role_view(ip: &str, token: &str) -> Option<Value> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect((ip, NOTIFY_PORT))
            .await
            .ok()?;
        let request =
            format!("GET /role HTTP/1.0\r\nHost: {ip}\r\nAuthorization: Bearer {token}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8(answer).ok()?;
        let (_, body) = text.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_never_answer_do_not_starve_another_namespace() {
    podium::telemetry::init(podium::telemetry::LogFormat::Text, "warn,podium=info");
    let testbed = Testbed::shared();
    testbed.install_crd().await.expect("install CRD");
    let client = testbed.client();
    let ns_a = testbed.create_namespace("fair-a").await.expect("namespace");
    let ns_b = testbed.create_namespace("fair-b").await.expect("namespace");

    let dir = tempfile::tempdir().unwrap();
    let work = common::exec_pods(&ns_b, "work", 3, dir.path()).await;
    let setup = Instant::now();
    let hanging = Hanging::start(HANGING_PODS).await;
    hanging_pods(&client, &ns_a, &hanging.ips).await;
    println!(
        "{HANGING_PODS} hanging pods in {ns_a} on port {} ready in {:?}",
        hanging.port,
        setup.elapsed()
    );

    let operator = Operator::start(
        client.clone(),
        OperatorConfig {
            http_addr: None,
            watch_namespace: None,
            election: None,
            service_account: Some((ns_b.clone(), OPERATOR_ACCOUNT.to_string())),
        },
    )
    .await
    .expect("start operator");
    let groups_b: Api<podium::crd::ElectionGroup> = Api::namespaced(client.clone(), &ns_b);
    groups_b
        .create(&PostParams::default(), &group("work", "work", NOTIFY_PORT))
        .await
        .expect("create B's group");
    let leader = wait_for(
        Duration::from_secs(20),
        "B's leader process to start",
        || async { work.runs().ok()?.into_iter().next() },
    )
    .await;
    let leader_ip = work.pods[&leader.pod].ip.clone();
    // `/role` shows the term only to a token minted for that pod.
    let token = work.operator_token(&leader.pod).await.expect("a token");
    println!("B's leader {} runs (epoch {})", leader.pod, leader.epoch);

    // The flood: A's groups elect leaders and tell all 300 pods their roles; none answers.
    let groups_a: Api<podium::crd::ElectionGroup> = Api::namespaced(client.clone(), &ns_a);
    for g in 0..HANGING_GROUPS {
        groups_a
            .create(
                &PostParams::default(),
                &group(&format!("hang-{g}"), &format!("hang-{g}"), hanging.port),
            )
            .await
            .expect("create A's group");
    }
    let flood = Instant::now();
    let mut samples = 0;
    let mut not_leading = Vec::new();
    let mut least_term_left = u64::MAX;
    while flood.elapsed() < FLOOD {
        match role_view(&leader_ip, &token).await {
            Some(view)
                if view["role"] == "leader"
                    && view["running"] == true
                    && view["termRemainingMillis"].as_u64().is_some_and(|m| m > 0) =>
            {
                let left = view["termRemainingMillis"].as_u64().unwrap_or(0);
                least_term_left = least_term_left.min(left);
            }
            other => not_leading.push((flood.elapsed(), other)),
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = operator.metrics.encode();
    operator.stop().await;

    let runs = work.runs().expect("the work log parses");
    let exec_log = std::fs::read_to_string(work.pod_log(&leader.pod)).unwrap_or_default();
    let expiries = exec_log.matches("the term ended without a renewal").count();
    let waits: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with(&format!(
                "podium_notification_waits_total{{namespace=\"{ns_a}\""
            ))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    println!(
        "during {FLOOD:?} of flood: B's leader seen leading in {}/{samples} samples, least term \
         left {least_term_left} ms; {expiries} term expiries; leader runs {runs:?}; A: {} \
         connections to {} of its pods, at most {} open at once, {waits} waits for a slot",
        samples - not_leading.len(),
        hanging.accepted.load(Ordering::Relaxed),
        hanging.reached(),
        hanging.most_open.load(Ordering::Relaxed),
    );
    assert!(
        not_leading.is_empty(),
        "B's leader was not leading in {} samples, from {:?} on: {:?}",
        not_leading.len(),
        not_leading.first().map(|s| s.0),
        not_leading.first().map(|s| &s.1),
    );
    assert_eq!(expiries, 0, "B's leader's term ran out:\n{exec_log}");
    assert!(
        runs.len() == 1 && runs[0].stop_ns.is_none(),
        "B's leader command stopped or moved: {runs:?}"
    );

    // A's pods really held what they could: its share of the sends, all the time, and more
    // sends waiting for a slot.
    let share = Caps::DEFAULT.per_namespace;
    assert!(
        hanging.reached() >= share,
        "only {} of A's pods were reached",
        hanging.reached()
    );
    assert!(waits > 0, "A's sends never waited for a slot:\n{metrics}");
    assert!(
        hanging.most_open.load(Ordering::Relaxed) <= share + share / 2,
        "A held more than its share of sends at once"
    );
}
