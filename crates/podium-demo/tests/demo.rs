//! `podium demo` end to end: the demo starts its own control plane (never the shared one), so
//! these tests also check that it leaves no process and no directory behind, whether it ends,
//! is interrupted, or cannot start at all.

use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podium_demo::{self as demo, Cause, DemoArgs};

/// Processes whose command line mentions `needle` (every control-plane process names its
/// temporary directory in its flags).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Testbed directories of process `pid` that still exist in the temp dir.
fn testbed_dirs_of(pid: u32) -> Vec<String> {
    let prefix = format!("podium-testbed-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn keeping_testbeds() -> bool {
    std::env::var_os("PODIUM_KEEP_TESTBED").is_some_and(|v| !v.is_empty() && v != "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_elects_fails_over_three_times_and_cleans_up() {
    let mut out = Vec::new();
    let started = Instant::now();
    let report = demo::run_with(
        &DemoArgs {
            keep: false,
            no_color: true,
        },
        &mut out,
        false,
        std::future::pending(),
    )
    .await
    .unwrap_or_else(|e| panic!("the demo failed: {e:#}"));
    let text = String::from_utf8(out).expect("the output is UTF-8");
    println!("{text}");
    println!("demo took {:?}", started.elapsed());

    assert!(!report.interrupted);
    assert!(!text.contains('\x1b'), "escape codes in plain output");
    for heading in [
        "① Start the control plane",
        "③ Who leads",
        "④ Failover: delete the leader",
        "⑤ Failover again",
        "⑥ Failover: the leader turns NotReady",
        "⑦ Your app and its role: real processes take over",
        "⑧ Where things stand",
        "Clean up",
    ] {
        assert!(text.contains(heading), "missing {heading:?}");
    }
    // The real kubectl table (or its stand-in with the same columns).
    assert!(
        text.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols == ["NAME", "LEADER", "EPOCH", "ELIGIBLE", "TTL", "AGE"]
        }),
        "no electiongroups table header in\n{text}"
    );
    assert!(text.contains("ROLE"), "no role column in\n{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("Service web-leader routes to web-") && l.contains("(10.244.")),
        "no Service routing line"
    );

    // Two failovers by deletion and one by NotReady, each with both times, in order.
    let causes: Vec<Cause> = report.failovers.iter().map(|f| f.cause).collect();
    assert_eq!(
        causes,
        [Cause::PodDeleted, Cause::PodDeleted, Cause::PodNotReady]
    );
    let (first, _) = report.first_leader.clone().expect("a first leader");
    let mut previous = first;
    for (i, f) in report.failovers.iter().enumerate() {
        assert_eq!(
            f.old_leader, previous,
            "failover {i} started from the leader"
        );
        assert_ne!(f.new_leader, f.old_leader);
        assert_eq!(
            f.epoch,
            i32::try_from(i).unwrap() + 2,
            "each failover bumps the epoch"
        );
        assert!(f.label_after <= f.service_after);
        assert!(f.service_after < Duration::from_secs(30));
        previous = f.new_leader.clone();
    }
    let delete_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("leader label moved") && l.contains("ms after the delete"))
        .collect();
    assert_eq!(delete_lines.len(), 2, "two timed deletions in\n{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("Service routes to it") && l.contains("ms after the delete"))
            .count(),
        2
    );
    assert!(
        text.lines()
            .any(|l| l.contains("leader label moved") && l.contains("ms after the readiness")),
        "no timed NotReady failover in\n{text}"
    );
    assert!(text.contains("epoch 3 -> 4"));
    // The workers: real podium exec processes, two timed takeovers, no overlap.
    assert_eq!(report.takeovers.len(), 2, "two takeovers in\n{text}");
    for t in &report.takeovers {
        assert_ne!(t.old, t.new);
        assert!(t.after < Duration::from_secs(30));
    }
    assert!(text.contains(": I am the leader (epoch 1)"), "{text}");
    assert!(text.contains(": I am a follower"), "{text}");
    assert!(text.contains(" 0 overlapping"), "{text}");

    let (count, sum) = report
        .operator_failover_seconds
        .expect("podium_failover_seconds read");
    // Three of the web group, two of the workers.
    assert_eq!(count, 5, "the operator timed five failovers");
    assert!(sum > 0.0);
    assert!(text.contains("podium_failover_seconds: count 5"));

    // Nothing left behind.
    let dir = report.testbed_dir.expect("the demo's testbed directory");
    let dir = dir.to_str().expect("UTF-8 path");
    assert!(
        text.contains(&format!("{dir} removed")) || keeping_testbeds(),
        "no cleanup line"
    );
    let survivors = processes_mentioning(dir);
    assert!(survivors.is_empty(), "left running: {survivors:#?}");
    if !keeping_testbeds() {
        assert!(!Path::new(dir).exists(), "{dir} still exists");
    }
}

/// A writer that a test can read while the demo writes to it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_mid_failover_stops_everything() {
    let out = Shared::default();
    let watched = out.clone();
    // Interrupt as soon as the first failover starts: operator, kubelet and control plane are
    // all running then.
    let interrupt = async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !watched.text().contains("$ kubectl delete pod") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let report = demo::run_with(&DemoArgs::default(), out.clone(), false, interrupt)
        .await
        .unwrap_or_else(|e| panic!("the demo failed: {e:#}"));
    let text = out.text();
    println!("{text}");
    assert!(report.interrupted, "the demo was not interrupted:\n{text}");
    assert!(text.contains("interrupted: stopping everything"));
    assert!(text.contains("operator stopped"));
    let dir = report.testbed_dir.expect("the demo's testbed directory");
    let dir = dir.to_str().expect("UTF-8 path");
    let survivors = processes_mentioning(dir);
    assert!(survivors.is_empty(), "left running: {survivors:#?}");
    if !keeping_testbeds() {
        assert!(!Path::new(dir).exists(), "{dir} still exists");
    }
}

/// Ctrl-C (SIGINT) on the real binary, mid-demo: it cleans up and exits with an error.
#[test]
fn ctrl_c_on_podium_demo_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_podium-demo"))
        .args(["--no-color"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start podium demo");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok(line) if line.contains("③ Who leads") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("podium demo never reached its third step: {e}");
            }
        }
    }
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let output = child.wait_with_output().expect("wait for podium demo");
    let lines = reader.join().expect("reader thread");
    let text = lines.join("\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked"),
        "podium demo panicked: {stderr}"
    );
    assert!(
        !output.status.success(),
        "an interrupted demo must not report success"
    );
    assert!(
        stderr.contains("interrupted"),
        "no interruption error: {stderr}"
    );
    assert!(text.contains("interrupted: stopping everything"), "{text}");
    assert!(text.contains("operator stopped"), "{text}");
    let survivors = processes_mentioning(&format!("podium-testbed-{pid}-"));
    assert!(survivors.is_empty(), "left running: {survivors:#?}");
    if !keeping_testbeds() {
        assert_eq!(testbed_dirs_of(pid), Vec::<String>::new());
    }
}

/// Without the control-plane binaries the demo explains how to get them, and does not panic.
#[test]
fn missing_binaries_give_the_install_hint() {
    let empty = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_podium-demo"))
        .args(["--no-color"])
        .env_remove("PODIUM_BIN_DIR")
        .env("PODIUM_CACHE", empty.path())
        .env("PATH", empty.path())
        .output()
        .expect("run podium demo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("scripts/install-deps.sh"), "{stderr}");
    assert!(
        stderr.contains("cannot start the local control plane"),
        "{stderr}"
    );
}
