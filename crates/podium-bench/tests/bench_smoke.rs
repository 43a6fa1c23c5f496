//! `podium bench --quick` end to end on a fresh testbed: it finishes in well under a minute
//! and its report has every row it promises, with the number of samples asked for.
//!
//! The operator runs as a child (`podium bench --operator-child`) when the `podium` binary has
//! the `bench` subcommand, else in the test process.

use std::time::Instant;

use podium_bench::{BenchArgs, run_with};

/// The row of the Markdown table whose first cells are `cells`, split into its cells.
fn row(markdown: &str, cells: &[&str]) -> Vec<String> {
    let prefix = format!("| {} |", cells.join(" | "));
    let line = markdown
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row starting {prefix:?} in\n{markdown}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_bench_reports_every_row() {
    let out = tempfile::tempdir().expect("temporary directory");
    let podium = env!("CARGO_BIN_EXE_podium-bench");
    let child = std::process::Command::new(podium)
        .args(["--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    let args = BenchArgs {
        quick: true,
        out: out.path().to_path_buf(),
        operator_bin: child.then(|| podium.into()),
        in_process_operator: !child,
        ..BenchArgs::default()
    };
    let started = Instant::now();
    let outcome = run_with(&args).await.expect("the bench runs");
    println!(
        "quick bench took {:.1}s (operator {}):\n{}",
        started.elapsed().as_secs_f64(),
        if child { "child" } else { "in-process" },
        outcome.markdown
    );
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    let md = &outcome.markdown;
    assert_eq!(
        std::fs::read_to_string(&outcome.path).expect("report file"),
        *md
    );

    for trigger in ["leader pod deleted", "leader Ready=False"] {
        for until in ["new leader labelled", "Service routes only to it"] {
            let cells = row(md, &["Podium", trigger, until]);
            assert_eq!(cells[3], "3", "rounds in {cells:?}");
        }
    }
    for peer in ["kube-leader-election 0.44", "client-go defaults (modelled)"] {
        for trigger in ["holder crashed (no step-down)", "holder stepped down"] {
            let line = md
                .lines()
                .find(|l| l.starts_with(&format!("| {peer}")) && l.contains(trigger))
                .unwrap_or_else(|| panic!("no {peer} / {trigger} row in\n{md}"));
            assert!(line.contains("| 1 |"), "one round expected: {line}");
        }
    }
    let scale = row(md, &["10"]);
    assert!(scale[1].starts_with("30 in"), "{scale:?}");
    assert!(scale[3].ends_with(" s"), "all 10 groups elected: {scale:?}");
    let cost = row(md, &["Lease write (update/create)"]);
    assert_eq!(cost.len(), 4, "two causes and the floor: {cost:?}");

    // The floors: each Podium figure next to the floor of the same run, with a ratio.
    let is_ratio = |cell: &str| {
        cell.strip_suffix('×')
            .is_some_and(|r| r.parse::<f64>().is_ok())
    };
    for trigger in ["leader pod deleted", "leader Ready=False"] {
        for until in ["new leader labelled", "Service routes only to it"] {
            let cells = row(md, &[trigger, until]);
            assert!(
                is_ratio(&cells[4]) && is_ratio(&cells[7]),
                "ratios in {cells:?}"
            );
            assert_eq!(cells[8], "3 / 3", "rounds in {cells:?}");
        }
        let acked = row(md, &[trigger, "floor: last write acknowledged"]);
        assert!(acked[3].parse::<f64>().is_ok(), "{acked:?}");
        let goal = row(
            md,
            &[
                &format!("failover, {trigger} → new label, p50"),
                "≤ 1.25× floor",
            ],
        );
        assert!(is_ratio(&goal[2]), "{goal:?}");
    }

    // Role notifications: real `podium exec` pods, each row with its samples, floors and ratios.
    for trigger in ["leader pod deleted", "leader Ready=False"] {
        for until in ["new leader told `leader`", "new leader's command started"] {
            let cells = row(md, &[trigger, until]);
            assert_eq!(cells[2], "3", "rounds in {cells:?}");
            assert!(is_ratio(&cells[8]), "a ratio to the floor in {cells:?}");
        }
    }
    let told = row(md, &["new leader labelled", "new leader told `leader`"]);
    assert!(
        is_ratio(&told[8]) && is_ratio(&told[9]),
        "ratios in {told:?}"
    );
    let floor = row(
        md,
        &["handover floor: decided", "new leader's command started"],
    );
    assert_eq!(floor[2], "6", "one floor handover per round: {floor:?}");
    let overlaps = row(md, &["leader commands running at once", "never"]);
    assert_eq!(overlaps[3], "yes", "{overlaps:?}");

    let scale_floor = md
        .lines()
        .filter(|l| l.starts_with("| 10 |"))
        .nth(1)
        .unwrap_or_else(|| panic!("no G=10 row against the floor in\n{md}"));
    let cells: Vec<&str> = scale_floor
        .trim_matches('|')
        .split('|')
        .map(str::trim)
        .collect();
    assert!(
        cells[2].ends_with(" s"),
        "the floor elected all 10: {cells:?}"
    );
    for ratio in [cells[3], cells[6], cells[8]] {
        assert!(is_ratio(ratio), "ratios in {cells:?}");
    }
}
