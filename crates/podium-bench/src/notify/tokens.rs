//! What per-pod tokens cost at scale: G groups with `spec.notify`, one pod each, all pods on one
//! loopback address where a responder plays `podium exec`'s side of the contract (epochs only
//! forward, a `leader` message with a nonce starts the term, a fresh nonce in every answer). It
//! verifies no token: the operator's cost is what is measured. The operator mints one token per
//! pod, so its TokenRequests are counted while it tells every pod its first role, and again over
//! a steady window, with its CPU per notification in that window.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::operator::OperatorSource;
use super::super::scale::{NODE, create_ready_pod};
use podium_core::crd::ElectionGroup;
use podium_testkit::counting::Counts;
use podium_testkit::leader_process::{NOTIFY_PORT, OPERATOR_ACCOUNT};
use podium_testkit::testbed::Testbed;

/// Concurrent API calls while creating pods and groups.
const CONCURRENCY: usize = 32;
const TOKEN_REQUEST: &str = "create serviceaccounts/token";

#[derive(Clone, Debug, Default)]
pub struct TokenCost {
    pub groups: usize,
    pub ttl_seconds: i32,
    /// From the first group's creation until every pod took a `leader` message (one term of
    /// that is the fresh operator's wait).
    pub all_told_leader: Option<Duration>,
    pub startup_token_requests: u64,
    pub window: Duration,
    pub window_token_requests: u64,
    /// Messages the responder answered in the window.
    pub window_messages: u64,
    pub window_cpu: Duration,
}

impl TokenCost {
    pub fn cpu_per_message(&self) -> Option<Duration> {
        (self.window_messages > 0).then(|| self.window_cpu / self.window_messages as u32)
    }
}

/// `podium exec`'s side of the contract for many pods, keyed by pod name.
#[derive(Default)]
struct Responder {
    pods: HashMap<String, PodState>,
    answered: u64,
    told_leader: usize,
}

#[derive(Default)]
struct PodState {
    epoch: u64,
    running: bool,
    next_nonce: u64,
    nonces: Vec<String>,
    ever_leader: bool,
}

impl Responder {
    /// The status and ack for one message.
    fn answer(&mut self, message: &Value) -> (u16, Value) {
        self.answered += 1;
        let name = message["pod"].as_str().unwrap_or_default().to_string();
        let epoch = message["epoch"].as_u64().unwrap_or(0);
        let pod = self.pods.entry(name.clone()).or_default();
        pod.next_nonce += 1;
        let nonce = format!("{name}-{}", pod.next_nonce);
        let mut accepted = epoch >= pod.epoch;
        if accepted {
            pod.epoch = epoch;
            match message["role"].as_str() {
                Some("leader") => {
                    let echoed = message["nonce"].as_str().unwrap_or_default();
                    accepted = pod.nonces.iter().any(|n| n == echoed);
                    if accepted && !pod.ever_leader {
                        pod.ever_leader = true;
                        self.told_leader += 1;
                    }
                    pod.running |= accepted;
                }
                _ => pod.running = false,
            }
        }
        pod.nonces.push(nonce.clone());
        if pod.nonces.len() > 8 {
            pod.nonces.remove(0);
        }
        let ack = json!({
            "nonce": nonce, "epoch": pod.epoch, "running": pod.running, "accepted": accepted,
        });
        (if accepted { 200 } else { 409 }, ack)
    }
}

pub async fn run(
    testbed: &Testbed,
    client: &Client,
    source: &OperatorSource<'_>,
    groups: usize,
    ttl_seconds: i32,
    window: Duration,
) -> Result<TokenCost> {
    let ns = testbed.create_namespace("bench-notify-tokens").await?;
    podium_testkit::testbed::kubelet::create_node(client, NODE).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let account: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": OPERATOR_ACCOUNT } }))?;
    accounts.create(&PostParams::default(), &account).await?;
    // Outside the loopback subnets the test kit hands out (127.0.x.x, 127.100-249.x.x).
    let ip = format!("127.252.{}.1", std::process::id() % 200 + 1);
    let responder = Arc::new(Mutex::new(Responder::default()));
    let serving = serve(&ip, responder.clone()).await?;

    let created = futures::stream::iter(0..groups)
        .map(|i| {
            let (client, ns, ip) = (client.clone(), ns.clone(), ip.clone());
            async move {
                let name = format!("t{i:04}");
                create_ready_pod(&client, &ns, &name, &format!("{name}-0"), "10.0.255.1", &ip).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    created.into_iter().collect::<Result<Vec<()>>>()?;

    let mut operator = source
        .start(
            testbed,
            Some(&ns),
            Some(&format!("{ns}/{OPERATOR_ACCOUNT}")),
            false,
            "notify-tokens",
        )
        .await?;
    let measured = async {
        operator.wait_ready(Duration::from_secs(120)).await?;
        let before = operator.counts().await?;
        let started = Instant::now();
        let made = futures::stream::iter(0..groups)
            .map(|i| {
                let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), &ns);
                async move {
                    let name = format!("t{i:04}");
                    let group: ElectionGroup = serde_json::from_value(json!({
                        "apiVersion": "podium.dev/v1alpha1", "kind": "ElectionGroup",
                        "metadata": { "name": name },
                        "spec": {
                            "selector": { "matchLabels": { "app": name } },
                            "leaseDurationSeconds": ttl_seconds,
                            "notify": { "port": NOTIFY_PORT },
                        },
                    }))?;
                    groups
                        .create(&PostParams::default(), &group)
                        .await
                        .with_context(|| format!("creating group {name}"))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for made in made {
            made?;
        }
        let deadline =
            started + Duration::from_secs(120) + Duration::from_secs(3 * ttl_seconds as u64);
        let all_told_leader = loop {
            if responder.lock().expect("responder").told_leader >= groups {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let at_startup = operator.counts().await?;
        let startup_token_requests = token_requests(&at_startup.since(&before));
        let cpu_before = operator.proc_sample()?.cpu;
        let answered_before = responder.lock().expect("responder").answered;
        tokio::time::sleep(window).await;
        let after = operator.counts().await?;
        let window_cpu = operator.proc_sample()?.cpu.saturating_sub(cpu_before);
        let window_messages = responder.lock().expect("responder").answered - answered_before;
        Ok::<_, anyhow::Error>(TokenCost {
            groups,
            ttl_seconds,
            all_told_leader,
            startup_token_requests,
            window,
            window_token_requests: token_requests(&after.since(&at_startup)),
            window_messages,
            window_cpu,
        })
    }
    .await;
    operator.stop().await;
    serving.abort();
    let cost = measured?;
    if cost.all_told_leader.is_none() {
        bail!(
            "not every pod was told leader: {} of {}",
            responder.lock().expect("responder").told_leader,
            groups
        );
    }
    Ok(cost)
}

fn token_requests(counts: &Counts) -> u64 {
    counts
        .by_kind
        .iter()
        .filter(|(kind, _)| kind.as_str() == TOKEN_REQUEST)
        .map(|(_, n)| n)
        .sum()
}

/// Answers role messages on `ip`:[`NOTIFY_PORT`] until aborted.
async fn serve(ip: &str, responder: Arc<Mutex<Responder>>) -> Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = format!("{ip}:{NOTIFY_PORT}").parse()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let responder = responder.clone();
            tokio::spawn(async move {
                // The operator keeps connections alive: answer requests until it hangs up.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(60), socket.read(&mut chunk))
                            .await
                    else {
                        return;
                    };
                    if n == 0 || buf.len() > 1 << 20 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some((length, head_end)) = complete(&buf) {
                        let body: Value = serde_json::from_slice(&buf[head_end..head_end + length])
                            .unwrap_or_default();
                        buf.drain(..head_end + length);
                        let (status, ack) = responder.lock().expect("responder").answer(&body);
                        let ack = ack.to_string();
                        let reason = if status == 200 { "OK" } else { "Conflict" };
                        let answer = format!(
                            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{ack}",
                            ack.len()
                        );
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }))
}

/// The body length and where the body starts, once `buf` holds a whole request.
fn complete(buf: &[u8]) -> Option<(usize, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some((length, head_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_responder_keeps_to_the_contract() {
        let mut r = Responder::default();
        let (status, ack) = r.answer(&json!({"pod": "p", "role": "pending", "epoch": 2}));
        assert_eq!((status, ack["running"].as_bool()), (200, Some(false)));
        let nonce = ack["nonce"].as_str().unwrap().to_string();
        let (status, _) =
            r.answer(&json!({"pod": "p", "role": "leader", "epoch": 2, "nonce": "x"}));
        assert_eq!(status, 409);
        let (status, ack) =
            r.answer(&json!({"pod": "p", "role": "leader", "epoch": 2, "nonce": nonce}));
        assert_eq!((status, ack["running"].as_bool()), (200, Some(true)));
        assert_eq!(r.told_leader, 1);
        let (status, _) = r.answer(&json!({"pod": "p", "role": "follower", "epoch": 1}));
        assert_eq!(status, 409);
    }

    #[test]
    fn requests_are_framed_by_content_length() {
        let one = b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(complete(one), Some((2, one.len() - 2)));
        assert_eq!(complete(&one[..one.len() - 1]), None);
        let mut token = Counts::default();
        token.by_kind.insert(TOKEN_REQUEST.into(), 3);
        token.by_kind.insert("get pods".into(), 9);
        assert_eq!(token_requests(&token), 3);
    }
}
