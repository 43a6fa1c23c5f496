//! The real `podium exec` under a hostile neighbour: slowloris connections past the connection
//! cap, oversized and stalled bodies, a flood of bad tokens, a nosy GET /role, and a SIGKILL.
//! Tokens come from the TokenRequest API of a real API server.
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use podium_core::notify::audience;
use podium_testkit::testbed::Testbed;
use podium_testkit::token_holder;
use serde_json::{Value, json};

/// The exec under test is pod `p0` (this UID) of group `ns/g`.
const UID: &str = "7d2e4c1a-0000-4000-8000-0000000000b1";
const PATH: &str = "/podium/notify";
/// The exec's cap on open connections.
const CAP: usize = 64;

async fn service_account(client: &kube::Client, ns: &str, name: &str) {
    token_holder::ensure_service_account(client, ns, name)
        .await
        .expect("the ServiceAccount");
}

async fn token(client: &kube::Client, ns: &str, name: &str, audience: &str) -> String {
    token_holder::mint(client, ns, name, audience)
        .await
        .expect("a token")
}

/// The operator's genuine token for the exec under test.
async fn operator_token(testbed: &Testbed) -> String {
    let admin = testbed.client();
    service_account(&admin, "podium-system", "podium").await;
    token(&admin, "podium-system", "podium", &audience("ns", "g", UID)).await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `podium exec` on loopback, its log in a file.
struct Exec {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Exec {
    async fn start(testbed: &Testbed, dir: &Path, command: &str) -> Exec {
        let port = free_port();
        let log = dir.join("exec.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_podium"))
            .env("KUBECONFIG", testbed.kubeconfig_path())
            .env("DIR", dir)
            .env_remove("RUST_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_UID")
            .env_remove("PODIUM_GROUP_NAME")
            .args([
                "exec",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--pod",
                "p0",
                "--namespace",
                "ns",
                "--pod-uid",
                UID,
                "--group",
                "g",
                "--grace",
                "2s",
                "--",
                "sh",
                "-c",
                command,
            ])
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start podium exec");
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Exec { child, port, log };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("podium exec did not listen on {port}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One request written as `head` (through the blank line) and `body`, the body from a thread
/// of its own and write errors ignored (the exec may hang up mid-body); the response is read
/// as it comes. (status, body, how long the answer took).
fn exchange(port: u16, head: String, body: Vec<u8>) -> (u16, String, Duration) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to podium exec");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let writing = std::thread::spawn(move || {
        for chunk in body.chunks(64 * 1024) {
            if writer.write_all(chunk).is_err() {
                return;
            }
        }
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            // A reset after the answer arrived (the exec hung up on an unread body).
            Err(e) if !response.is_empty() => {
                println!("after {} bytes of the answer: {e}", response.len());
                break;
            }
            Err(e) => panic!("no answer: {e}"),
        }
    }
    let took = started.elapsed();
    drop(stream);
    let _ = writing.join();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, took)
}

fn head(method: &str, path: &str, token: Option<&str>, length: Option<usize>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let length = length.map_or("Transfer-Encoding: chunked\r\n".to_string(), |n| {
        format!("Content-Length: {n}\r\n")
    });
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n{length}\r\n"
    )
}

/// A POST of `body` to the notify path, with its length declared.
fn post(port: u16, token: Option<&str>, body: &str) -> (u16, String, Duration) {
    exchange(
        port,
        head("POST", PATH, token, Some(body.len())),
        body.as_bytes().to_vec(),
    )
}

fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String, Duration) {
    exchange(port, head("GET", path, token, Some(0)), Vec::new())
}

fn message(role: &str, epoch: u64, nonce: Option<&str>) -> String {
    json!({
        "group": "ns/g", "pod": "p0", "podUid": UID, "role": role, "leader": "p0",
        "epoch": epoch, "termMillis": 60_000, "nonce": nonce,
    })
    .to_string()
}

/// Opens `count` connections that each send a request line and then one header byte a
/// second, never finishing the head, for at most `hold`. Returns, per connection, how long
/// after its opening the exec closed it (None: still open at the end).
fn slowloris(port: u16, count: usize, hold: Duration) -> Vec<Option<Duration>> {
    let mut conns: Vec<(TcpStream, Instant, Option<Duration>)> = (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nX-Slow: ");
            stream.set_nonblocking(true).unwrap();
            (stream, Instant::now(), None)
        })
        .collect();
    let started = Instant::now();
    let mut last_byte = Instant::now();
    while started.elapsed() < hold && conns.iter().any(|(_, _, closed)| closed.is_none()) {
        let drip = last_byte.elapsed() >= Duration::from_secs(1);
        if drip {
            last_byte = Instant::now();
        }
        for (stream, opened, closed) in conns.iter_mut().filter(|c| c.2.is_none()) {
            let mut byte = [0u8; 64];
            let gone = match stream.read(&mut byte) {
                // EOF or an answer (a 408 or such): either way the exec is done with it.
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            };
            let gone = gone || (drip && stream.write_all(b"a").is_err());
            if gone {
                *closed = Some(opened.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    conns.into_iter().map(|(_, _, closed)| closed).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_oversized_bodies_leave_the_operator_served() {
    let testbed = Testbed::shared();
    let good = operator_token(testbed).await;
    let dir = tempfile::tempdir().unwrap();
    let exec = Exec::start(testbed, dir.path(), "exec sleep 1000").await;
    let port = exec.port;

    // Half again as many slow connections as the cap; each sends a byte a second.
    let attack = CAP + CAP / 2;
    let flood =
        tokio::task::spawn_blocking(move || slowloris(port, attack, Duration::from_secs(15)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile a stalled body from someone with a valid token: answered 408 once the body
    // deadline passed, not held forever.
    let stalled = {
        let good = good.clone();
        tokio::task::spawn_blocking(move || {
            exchange(
                port,
                head("POST", PATH, Some(&good), Some(200)),
                b"{\"group\":".to_vec(),
            )
        })
    };
    // The operator, in the middle of it: each message answered within a second.
    let mut nonce = None;
    for epoch in 1..=4 {
        let body = message("follower", epoch, None);
        let good = good.clone();
        let (status, answer, took) =
            tokio::task::spawn_blocking(move || post(port, Some(&good), &body))
                .await
                .unwrap();
        println!("operator message {epoch} under the flood: {status} in {took:?}");
        assert_eq!(status, 200, "{answer}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        let ack: Value = serde_json::from_str(&answer).unwrap();
        nonce = ack["nonce"].as_str().map(String::from);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(nonce.is_some());
    let (status, _, took) = tokio::task::spawn_blocking(move || get(port, "/readyz", None))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "/readyz took {took:?}");

    let closed = flood.await.unwrap();
    let mut times: Vec<Duration> = closed.iter().map(|c| c.expect("closed")).collect();
    times.sort();
    println!(
        "slowloris connections closed after: first {:?}, #{} {:?}, last {:?}",
        times[0],
        attack - CAP,
        times[attack - CAP - 1],
        times[attack - 1]
    );
    // Past the cap, the oldest idle ones went at once (the operator's connections took a few
    // more); the rest at the header deadline, despite a byte every second.
    assert!(
        times[attack - CAP - 1] < Duration::from_secs(2),
        "{times:?}"
    );
    assert!(times[attack - 1] < Duration::from_secs(8), "{times:?}");
    assert!(
        times
            .iter()
            .filter(|t| **t >= Duration::from_secs(4))
            .count()
            > CAP / 2,
        "most slow connections lasted until the header deadline: {times:?}"
    );

    let (status, answer, took) = stalled.await.unwrap();
    println!("stalled body: {status} after {took:?}");
    assert_eq!(status, 408, "{answer}");
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(8));

    // 3 MiB declared and not sent: without a token 401 at once (no byte of the body read),
    // with the operator's token 413 at once.
    let big = 3 << 20;
    for (token, expected) in [(None, 401), (Some(good.clone()), 413)] {
        let (status, answer, took) = tokio::task::spawn_blocking(move || {
            exchange(
                port,
                head("POST", PATH, token.as_deref(), Some(big)),
                vec![],
            )
        })
        .await
        .unwrap();
        println!("3 MiB declared, not sent: {status} in {took:?} {answer}");
        assert_eq!(status, expected, "{answer}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    // 3 MiB sent, declared or chunked: refused the same way.
    for (token, length, expected) in [
        (None, Some(big), 401),
        (None, None, 401),
        (Some(good.clone()), Some(big), 413),
        (Some(good.clone()), None, 413),
    ] {
        let body = match length {
            Some(_) => vec![b' '; big],
            None => {
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                chunk.repeat(big / (64 * 1024)).into_bytes()
            }
        };
        let (status, answer, took) = tokio::task::spawn_blocking(move || {
            exchange(port, head("POST", PATH, token.as_deref(), length), body)
        })
        .await
        .unwrap();
        println!("3 MiB sent (length {length:?}): {status} in {took:?}");
        assert_eq!(status, expected, "{answer}");
    }
    // A body just under the limit is read (and refused only for what it says).
    let padded = {
        let mut m: Value = serde_json::from_str(&message("follower", 5, None)).unwrap();
        m["leader"] = json!("p".repeat(15 * 1024));
        m.to_string()
    };
    let good2 = good.clone();
    let (status, answer, _) =
        tokio::task::spawn_blocking(move || post(port, Some(&good2), &padded))
            .await
            .unwrap();
    assert_eq!(status, 200, "{answer}");
    let ack: Value = serde_json::from_str(&answer).unwrap();
    let nonce = ack["nonce"].as_str().map(String::from);

    // And the operator still gets through at once.
    let body = message("leader", 6, nonce.as_deref());
    let good2 = good.clone();
    let (status, answer, took) =
        tokio::task::spawn_blocking(move || post(port, Some(&good2), &body))
            .await
            .unwrap();
    println!("operator after the abuse: {status} in {took:?} {answer}");
    assert_eq!(status, 200, "{answer}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let log = exec.log();
    assert!(log.contains("too many open connections"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_quietly_and_role_hides_the_details() {
    let testbed = Testbed::shared();
    let admin = testbed.client();
    let good = operator_token(testbed).await;
    let other_ns = testbed.create_namespace("exec-hostile").await.unwrap();
    service_account(&admin, &other_ns, "other").await;
    let stranger = token(&admin, &other_ns, "other", &audience("ns", "g", UID)).await;
    let dir = tempfile::tempdir().unwrap();
    let exec = Exec::start(testbed, dir.path(), "exec sleep 1000").await;
    let port = exec.port;

    // Leading at epoch 2: /role has something to hide.
    let good2 = good.clone();
    let (status, answer, _) = tokio::task::spawn_blocking(move || {
        post(port, Some(&good2), &message("follower", 1, None))
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let nonce = serde_json::from_str::<Value>(&answer).unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_string();
    let good2 = good.clone();
    let (status, answer, _) = tokio::task::spawn_blocking(move || {
        post(port, Some(&good2), &message("leader", 2, Some(&nonce)))
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");

    for (what, token) in [
        ("no token", None),
        ("another ServiceAccount's token", Some(stranger.clone())),
        ("garbage", Some("a.b.c".to_string())),
    ] {
        let (status, answer, _) =
            tokio::task::spawn_blocking(move || get(port, "/role", token.as_deref()))
                .await
                .unwrap();
        println!("/role with {what}: {answer}");
        assert_eq!(status, 200);
        let view: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(view, json!({"role": "leader"}), "{what}");
    }
    let good2 = good.clone();
    let (_, answer, _) = tokio::task::spawn_blocking(move || get(port, "/role", Some(&good2)))
        .await
        .unwrap();
    println!("/role with the operator's token: {answer}");
    let view: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(view["leadingEpoch"].as_u64(), Some(2), "{view}");
    assert!(view["pid"].as_u64().is_some(), "{view}");

    // A thousand bad tokens of four kinds, from four threads.
    let forged = {
        // A header naming a key the cluster never had: each one asks for a JWKS refetch.
        let header = base64_url(br#"{"alg":"RS256","kid":"forged"}"#);
        let payload = base64_url(br#"{"sub":"system:serviceaccount:podium-system:podium"}"#);
        format!("{header}.{payload}.c2ln")
    };
    let kinds = [
        None,
        Some("garbage".to_string()),
        Some(stranger.clone()),
        Some(forged),
    ];
    let started = Instant::now();
    let floods: Vec<_> = kinds
        .into_iter()
        .map(|token| {
            tokio::task::spawn_blocking(move || {
                let body = message("follower", 99, None);
                (0..250)
                    .map(|_| post(port, token.as_deref(), &body).0)
                    .filter(|&status| status == 401)
                    .count()
            })
        })
        .collect();
    let mut refused = 0;
    for flood in floods {
        refused += flood.await.unwrap();
    }
    println!(
        "1000 bad tokens in {:?}: {refused} refused",
        started.elapsed()
    );
    assert_eq!(refused, 1000);
    let log = exec.log();
    let warnings = log
        .lines()
        .filter(|line| line.contains("its token does not verify"))
        .count();
    println!("warning lines for 1000 bad tokens: {warnings}");
    assert!(warnings >= 1, "{log}");
    assert!(warnings <= 3, "{log}");

    // Still the operator's.
    let (status, answer, took) =
        tokio::task::spawn_blocking(move || post(port, Some(&good), &message("follower", 3, None)))
            .await
            .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `pid` still runs (a zombie has stopped running; its reaper may be slow).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_exec_takes_its_command_with_it() {
    let testbed = Testbed::shared();
    let good = operator_token(testbed).await;
    let dir = tempfile::tempdir().unwrap();
    // The command ignores SIGTERM: only SIGKILL ends it.
    let mut exec = Exec::start(
        testbed,
        dir.path(),
        "trap '' TERM; echo $$ > \"$DIR/pid\"; while :; do sleep 1; done",
    )
    .await;
    let port = exec.port;
    let good2 = good.clone();
    let (status, answer, _) = tokio::task::spawn_blocking(move || {
        post(port, Some(&good2), &message("follower", 1, None))
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let nonce = serde_json::from_str::<Value>(&answer).unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, answer, _) = tokio::task::spawn_blocking(move || {
        post(port, Some(&good), &message("leader", 2, Some(&nonce)))
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let mut pid = None;
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(dir.path().join("pid"))
            && let Ok(p) = text.trim().parse::<i32>()
        {
            pid = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = pid.expect("the command wrote its pid");
    assert!(running(pid));

    exec.child.start_kill().unwrap();
    exec.child.wait().await.unwrap();
    let killed = Instant::now();
    while running(pid) && killed.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "command {pid} after SIGKILL to podium exec: running={}",
        running(pid)
    );
    assert!(
        !running(pid),
        "the command outlived podium exec by a second"
    );
}
