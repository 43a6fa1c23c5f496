//! `podium exec` against a real API server: the JWKS it serves, tokens from the TokenRequest
//! API, and the real binary taking (and refusing) role messages over HTTP.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::Api;
use podium_core::notify::{AUDIENCE_PREFIX, audience};
use podium_testkit::testbed::Testbed;
use podium_testkit::token_holder;
use serde_json::{Value, json};

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

/// GET /openid/v1/jwks with `client`: the HTTP status.
async fn jwks_status(client: &kube::Client) -> u16 {
    let request = http::Request::get("/openid/v1/jwks")
        .body(Vec::new())
        .unwrap();
    match client.request_text(request).await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("GET /openid/v1/jwks: {e}"),
    }
}

/// One HTTP/1.1 request to the exec on loopback: (status, body).
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to podium exec");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn message(role: &str, epoch: u64, nonce: Option<&str>) -> String {
    message_with_term(role, epoch, nonce, 60_000)
}

/// The exec under test is pod `p0` (UID [`UID`]) of group `ns/g`.
const UID: &str = "3f1c0b1e-0000-4000-8000-00000000a0a0";

fn message_with_term(role: &str, epoch: u64, nonce: Option<&str>, term_millis: u64) -> String {
    json!({
        "group": "ns/g", "pod": "p0", "podUid": UID, "role": role, "leader": "p0",
        "epoch": epoch, "termMillis": term_millis, "nonce": nonce,
    })
    .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_exec_takes_only_the_operators_tokens() {
    let testbed = Testbed::shared();
    let admin = testbed.client();

    // The API server publishes its token keys (ServiceAccountIssuerDiscovery, beta in 1.20).
    assert_eq!(jwks_status(&admin).await, 200);
    let text = admin
        .request_text(
            http::Request::get("/openid/v1/jwks")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let jwks: Value = serde_json::from_str(&text).unwrap();
    println!("JWKS: {jwks}");
    assert!(!jwks["keys"].as_array().unwrap().is_empty());

    // Can a ServiceAccount read them? On 1.20 yes, by default: the bootstrap policy binds
    // system:service-account-issuer-discovery to every ServiceAccount. A cluster that removed
    // that binding needs one for the app's ServiceAccount.
    service_account(&admin, "podium-system", "podium").await;
    let sa_client = testbed
        .service_account_client("podium-system", "podium")
        .await
        .unwrap();
    assert_eq!(
        jwks_status(&sa_client).await,
        200,
        "a ServiceAccount cannot read the JWKS by default (update the report and the chart)"
    );
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let binding = bindings
        .get("system:service-account-issuer-discovery")
        .await
        .expect("the default issuer-discovery binding");
    let binding = serde_json::to_value(&binding).unwrap();
    println!(
        "default binding: {} -> {}",
        binding["roleRef"], binding["subjects"]
    );
    assert_eq!(
        binding["roleRef"]["name"],
        "system:service-account-issuer-discovery"
    );
    assert!(
        binding["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "Group" && s["name"] == "system:serviceaccounts"),
        "{binding}"
    );

    let other_ns = testbed.create_namespace("notify-auth").await.unwrap();
    service_account(&admin, &other_ns, "other").await;
    let own = audience("ns", "g", UID);
    let good = token(&admin, "podium-system", "podium", &own).await;
    let wrong_audience = token(&admin, "podium-system", "podium", "https://example.invalid").await;
    let other = token(&admin, &other_ns, "other", &own).await;
    // The operator's genuine tokens, minted for other destinations: each is worthless here.
    let operator_token = |audience: String| {
        let admin = admin.clone();
        async move { token(&admin, "podium-system", "podium", &audience).await }
    };
    let another_member = operator_token(audience("ns", "g", "uid-of-p1")).await;
    let another_group = operator_token(audience("ns", "h", UID)).await;
    let another_namespace = operator_token(audience("tenant", "g", UID)).await;
    let unbound = operator_token(AUDIENCE_PREFIX.to_string()).await;
    let tampered = {
        let (rest, signature) = good.rsplit_once('.').unwrap();
        let mut signature = signature.to_string();
        let last = if signature.ends_with('A') { "B" } else { "A" };
        signature.replace_range(signature.len() - 1.., last);
        // Flip a middle character too: the last one may only carry padding bits.
        let middle = signature.len() / 2;
        let c = if &signature[middle..=middle] == "A" {
            "B"
        } else {
            "A"
        };
        signature.replace_range(middle..=middle, c);
        format!("{rest}.{signature}")
    };

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let port = free_port();
    let mut exec = tokio::process::Command::new(env!("CARGO_BIN_EXE_podium"))
        .env("KUBECONFIG", testbed.kubeconfig_path())
        .env("LOG", &log)
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
            "5s",
            "--",
            "sh",
            "-c",
            // At epoch 5 the command gives up at once.
            "echo \"started $PODIUM_EPOCH $PODIUM_GROUP\" >> \"$LOG\"; \
             if [ \"$PODIUM_EPOCH\" = 5 ]; then exit 2; fi; exec sleep 1000",
        ])
        .kill_on_drop(true)
        .spawn()
        .expect("start podium exec");

    let mut up = false;
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "podium exec did not listen");
    assert_eq!(http(port, "GET", "/readyz", None, "").0, 200);

    let path = "/podium/notify";
    let follower = message("follower", 1, None);
    let send = |token: Option<String>, body: String| {
        tokio::task::spawn_blocking(move || http(port, "POST", path, token.as_deref(), &body))
    };
    for (what, token) in [
        ("no token", None),
        ("wrong audience", Some(wrong_audience)),
        ("another ServiceAccount", Some(other)),
        ("tampered signature", Some(tampered)),
        (
            "the operator's token for another member",
            Some(another_member),
        ),
        (
            "the operator's token for another group",
            Some(another_group),
        ),
        (
            "the operator's token for another namespace",
            Some(another_namespace),
        ),
        (
            "the operator's token with the unbound audience",
            Some(unbound),
        ),
    ] {
        let (status, body) = send(token, follower.clone()).await.unwrap();
        println!("{what}: {status} {body}");
        assert_eq!(status, 401, "{what}: {body}");
        assert!(!body.contains("nonce"), "{what}: {body}");
    }
    // The right token, a body for someone else or out of bounds: refused before anything in it
    // is believed, and no nonce handed out.
    let with = |edit: fn(&mut Value)| {
        let mut body: Value = serde_json::from_str(&message("follower", 1 << 53, None)).unwrap();
        body["epoch"] = json!(1);
        edit(&mut body);
        body.to_string()
    };
    for (what, body, expected) in [
        ("another pod", with(|m| m["pod"] = json!("p1")), 403),
        (
            "another pod UID",
            with(|m| m["podUid"] = json!("uid-of-p1")),
            403,
        ),
        ("another group", with(|m| m["group"] = json!("ns/h")), 403),
        (
            "another namespace",
            with(|m| m["group"] = json!("tenant/g")),
            403,
        ),
        (
            "no pod UID",
            with(|m| drop(m.as_object_mut().unwrap().remove("podUid"))),
            400,
        ),
        ("epoch 2^53", with(|m| m["epoch"] = json!(1u64 << 53)), 400),
        (
            "epoch above int32",
            with(|m| m["epoch"] = json!(i32::MAX as u64 + 1)),
            400,
        ),
        (
            "a term over an hour",
            with(|m| m["termMillis"] = json!(3_600_001)),
            400,
        ),
        ("a negative epoch", with(|m| m["epoch"] = json!(-1)), 400),
        (
            "a negative term",
            with(|m| m["termMillis"] = json!(-1)),
            400,
        ),
        ("an epoch past u64", with(|m| m["epoch"] = json!(1e30)), 400),
        ("an unknown role", with(|m| m["role"] = json!("king")), 400),
    ] {
        let (status, answer) = send(Some(good.clone()), body).await.unwrap();
        println!("{what}: {status} {answer}");
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(!answer.contains("nonce"), "{what}: {answer}");
    }
    let (status, body) = send(Some(good.clone()), "{not json".into()).await.unwrap();
    assert_eq!(status, 400, "{body}");

    let (status, body) = send(Some(good.clone()), follower).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let ack: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (ack["accepted"].as_bool(), ack["running"].as_bool()),
        (Some(true), Some(false))
    );
    let nonce = ack["nonce"].as_str().unwrap().to_string();
    assert_eq!(nonce.len(), 32);

    let (status, body) = send(Some(good.clone()), message("leader", 3, Some(&nonce)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let ack: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ack["running"].as_bool(), Some(true), "{body}");
    let mut started = String::new();
    for _ in 0..100 {
        started = std::fs::read_to_string(&log).unwrap_or_default();
        if !started.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(started, "started 3 ns/g\n");
    // The full view (epochs, pid) is for the operator's token only.
    let viewer = good.clone();
    let (_, role) =
        tokio::task::spawn_blocking(move || http(port, "GET", "/role", Some(&viewer), ""))
            .await
            .unwrap();
    let role: Value = serde_json::from_str(&role).unwrap();
    println!("/role: {role}");
    assert_eq!(role["running"].as_bool(), Some(true));
    assert_eq!(role["leadingEpoch"].as_u64(), Some(3));
    let pid = role["pid"].as_u64().expect("a pid while running");

    // Demoted at a higher epoch: answered only once the command has exited.
    let (status, body) = send(Some(good.clone()), message("follower", 4, None))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let ack: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ack["running"].as_bool(), Some(false), "{body}");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the command still runs after the demotion was answered: {stat}"
    );

    // A delayed leader message from the old epoch is refused.
    let nonce = ack["nonce"].as_str().unwrap().to_string();
    let (status, body) = send(Some(good.clone()), message("leader", 3, Some(&nonce)))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    let ack: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (ack["accepted"].as_bool(), ack["running"].as_bool()),
        (Some(false), Some(false))
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "started 3 ns/g\n");

    // Leading at epoch 5, the command exits on its own: /readyz turns 503 so that the
    // readiness probe hands leadership on; a demotion clears it.
    let nonce = ack["nonce"].as_str().unwrap().to_string();
    let (status, body) = send(Some(good.clone()), message("leader", 5, Some(&nonce)))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut ready = 200;
    for _ in 0..100 {
        ready = http(port, "GET", "/readyz", None, "").0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, 503, "/readyz once the command gave up");
    let (status, body) = send(Some(good.clone()), message("follower", 6, None))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(http(port, "GET", "/readyz", None, "").0, 200);

    // A term of 1.5 s with no renewal: the command stops on its own clock.
    let ack: Value = serde_json::from_str(&body).unwrap();
    let nonce = ack["nonce"].as_str().unwrap().to_string();
    let (status, body) = send(
        Some(good.clone()),
        message_with_term("leader", 7, Some(&nonce), 1_500),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let role: Value = serde_json::from_str(&http(port, "GET", "/role", Some(&good), "").1).unwrap();
    assert_eq!(role["running"].as_bool(), Some(true), "{role}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let role: Value = serde_json::from_str(&http(port, "GET", "/role", Some(&good), "").1).unwrap();
    println!("/role after the term: {role}");
    assert_eq!(role["running"].as_bool(), Some(false), "{role}");
    assert_eq!(role["leadingEpoch"], Value::Null, "{role}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "started 3 ns/g\nstarted 5 ns/g\nstarted 7 ns/g\n"
    );

    // SIGTERM: podium exec exits 0.
    let pid = exec.id().unwrap() as i32;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(10), exec.wait())
        .await
        .expect("podium exec exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
