//! Resource hygiene: groups created and deleted over and over leak no tasks, no watches and no
//! memory; and the real binary stops within 5 s of SIGTERM and releases the operator Lease.
//!
//! The create/delete cycles run 500 times in CI (4 lanes of 125, about 15 s on two cores) and
//! 5,000 times with `PODIUM_SOAK=1`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, RunOperator, fixture, wait_for};
use futures::future::join_all;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use podium::crd::ROLE_LABEL;
use podium_testkit::testbed::Testbed;
use serde_json::json;

/// The tests here measure the whole process (tasks, memory) and the API server (watches): one
/// at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cycles() -> usize {
    if std::env::var("PODIUM_SOAK").is_ok_and(|v| v == "1") {
        5_000
    } else {
        500
    }
}

/// Resident memory of this process in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// `apiserver_registered_watchers` for pods, leases and ElectionGroups, from the API server's
/// own metrics: the watches every client holds open.
async fn registered_watchers(client: &kube::Client) -> u64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client
        .request_text(request)
        .await
        .expect("apiserver metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_registered_watchers{"))
        .filter(|l| {
            l.contains(r#"kind="Pod""#)
                || l.contains(r#"kind="Lease""#)
                || l.contains(r#"kind="ElectionGroup""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Creates group `name` over `app`, waits until its Lease names a pod, deletes it, and waits
/// until it is gone (the finalizer has run).
async fn cycle(f: &Fixture, name: &str, app: &str) {
    f.group(name, app, json!({})).await;
    wait_for(
        Duration::from_secs(10),
        &format!("{name} elected"),
        || async {
            let l = f.leases().get_opt(name).await.ok()??;
            l.spec?
                .holder_identity
                .filter(|h| !h.is_empty())
                .map(|_| ())
        },
    )
    .await;
    f.groups().delete(name, &Default::default()).await.unwrap();
    wait_for(
        Duration::from_secs(10),
        &format!("{name} deleted"),
        || async { f.groups().get_opt(name).await.ok()?.is_none().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_and_deleting_groups_leaks_no_tasks_watches_or_memory() {
    let _serial = SERIAL.lock().await;
    let f = fixture("hygiene").await;
    const LANES: usize = 4;
    for lane in 0..LANES {
        f.deploy(&format!("app{lane}"), 1).await;
    }
    let operator = f.operator().await;
    let admin = Testbed::shared().client();

    // Warm up: first-use allocations, connection pools, metric families.
    join_all((0..LANES).map(|lane| {
        let f = &f;
        async move { cycle(f, &format!("warm-{lane}"), &format!("app{lane}")).await }
    }))
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tasks_before = alive_tasks();
    let rss_before = rss_kib();
    let watches_before = registered_watchers(&admin).await;

    let n = cycles();
    let started = Instant::now();
    join_all((0..LANES).map(|lane| {
        let f = &f;
        async move {
            for i in 0..n / LANES {
                cycle(f, &format!("g-{lane}-{i}"), &format!("app{lane}")).await;
            }
        }
    }))
    .await;
    let took = started.elapsed();

    // Let the last reconciles and requeues drain. Every watch is re-established every few
    // minutes (timeoutSeconds), so a reconnect in progress may briefly count one more.
    let mut tasks_after = alive_tasks();
    let mut watches_after = registered_watchers(&admin).await;
    let settle = Instant::now() + Duration::from_secs(20);
    while (tasks_after > tasks_before + 10 || watches_after > watches_before)
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tasks_after = alive_tasks();
        watches_after = registered_watchers(&admin).await;
    }
    let rss_after = rss_kib();
    println!(
        "{n} groups created and deleted in {took:?}: tasks {tasks_before} -> {tasks_after}, \
         VmRSS {} -> {} MiB, pod/lease/group watches on the API server {watches_before} -> {watches_after}",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        tasks_after <= tasks_before + 10,
        "tasks grew from {tasks_before} to {tasks_after}"
    );
    // The count covers every client of the shared API server (the controller-manager's
    // informers re-establish their watches now and then), so allow a little jitter: a watch
    // leaked per group would add one per cycle, far above this.
    assert!(
        watches_after <= watches_before + 2,
        "watches grew from {watches_before} to {watches_after} over {n} cycles"
    );
    // Slack for the allocator and for kube's event recorder, which keeps every event it sent
    // for 6 minutes (about 3 KiB per cycled group); a per-group leak of 100 KiB would show.
    let slack = 24 * 1024 + 4 * n as u64;
    assert!(
        rss_after <= rss_before + slack,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Every trace is gone: no Lease of a cycled group, no labels on the pods.
    let leases = f.leases().list(&ListParams::default()).await.unwrap();
    assert!(
        leases.items.iter().all(|l| !l.name_any().starts_with("g-")),
        "{:?}",
        leases
            .items
            .iter()
            .map(|l| l.name_any())
            .collect::<Vec<_>>()
    );
    let labelled = f
        .pods()
        .list(&ListParams::default().labels(ROLE_LABEL))
        .await
        .unwrap();
    assert!(labelled.items.is_empty());
    let metrics = operator.metrics.encode();
    assert!(
        !metrics.contains(r#"group="g-"#),
        "per-group metrics outlived their groups"
    );
    operator.stop().await;
}

/// Kills the child on drop, so a failed assertion leaves no operator running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn operator_lease(ns: &str) -> Option<Lease> {
    Api::<Lease>::namespaced(Testbed::shared().client(), ns)
        .get_opt("podium-operator")
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_binary_within_five_seconds_and_releases_the_operator_lease() {
    let _serial = SERIAL.lock().await;
    let f = fixture("sigterm").await;
    f.deploy("web", 2).await;
    let testbed = Testbed::shared();
    let child = Command::new(env!("CARGO_BIN_EXE_podium"))
        .args([
            "run",
            "--leader-elect",
            "--leader-election-namespace",
            &f.ns,
            "--leader-election-ttl",
            "15",
            "--identity",
            "sigterm-test",
            "--watch-namespace",
            &f.ns,
            "--http-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", testbed.kubeconfig_path())
        .env("RUST_LOG", "info")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the podium binary");
    let mut child = Running(child);

    // It leads, and it works: a group gets a leader.
    wait_for(
        Duration::from_secs(30),
        "the binary to hold the operator Lease",
        || {
            let ns = f.ns.clone();
            async move {
                let holder = operator_lease(&ns).await?.spec?.holder_identity?;
                (holder == "sigterm-test").then_some(())
            }
        },
    )
    .await;
    f.group("web", "web", json!({})).await;
    f.wait_leader_other_than(None, Duration::from_secs(10))
        .await;

    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = wait_for(Duration::from_secs(10), "the binary to exit", || {
        let exited = child.0.try_wait().expect("try_wait");
        async move { exited }
    })
    .await;
    let took = sent.elapsed();
    println!("podium exited {took:?} after SIGTERM with {exit}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(exit.success(), "exit status {exit}");
    let lease = operator_lease(&f.ns).await.expect("the operator Lease");
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert_eq!(holder, "", "the operator Lease was not released");
}
