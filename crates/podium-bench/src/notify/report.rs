//! The report's notification section and goal rows.

use std::fmt::Write as _;
use std::time::Duration;

use super::tokens::TokenCost;
use super::{NotifyResults, TriggerResults};
use crate::failover::FailoverResults;
use crate::floor::report::{ratio_of, times, trigger};
use crate::report::one_line;
use crate::stats::{Summary, ms};

/// The goal: the new leader is told `leader` within this long of its label, p99.
pub const LABEL_TO_NOTIFIED_GOAL: Duration = Duration::from_millis(100);

/// Which samples of a trigger's results a row shows.
type Samples = fn(&TriggerResults) -> &[Duration];

/// The rows timed from the trigger, and whether a floor applies (the failover floor's new
/// label plus the handover floor's time to the same outcome).
const FROM_TRIGGER: &[(&str, Samples, Option<FloorOf>)] = &[
    ("new leader labelled", |r| &r.label, None),
    ("old leader's command stopped", |r| &r.old_stopped, None),
    (
        "new leader told `leader`",
        |r| &r.notified,
        Some(FloorOf::Notified),
    ),
    (
        "new leader's command started",
        |r| &r.started,
        Some(FloorOf::Started),
    ),
];

#[derive(Clone, Copy)]
enum FloorOf {
    Notified,
    Started,
}

impl FloorOf {
    fn samples(self, r: &NotifyResults) -> &[Duration] {
        match self {
            FloorOf::Notified => &r.floor.notified,
            FloorOf::Started => &r.floor.started,
        }
    }
}

pub fn section(
    md: &mut String,
    result: &Result<NotifyResults, String>,
    failover: Option<&FailoverResults>,
) {
    let _ = writeln!(
        md,
        "## Role notifications: the application's own handover\n"
    );
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(md, "Failed: {}\n", one_line(e));
            return;
        }
    };
    let _ = writeln!(
        md,
        "Four pods of a group with `spec.notify`, each a real `podium exec` on a loopback IP \
         whose command logs its start and stop. Break-before-make: the new leader is told \
         `leader` only once the old one has answered its demotion (after its command exited) \
         or is gone. Milliseconds from the trigger, from the harness's clock, the pods' logs \
         and the harness's watch (one machine, one clock).\n"
    );
    let _ = writeln!(
        md,
        "The handover floor is two idle `podium exec` pods no group selects, handed over by \
         the harness with the two messages break-before-make needs (demote, answered once the \
         command exited; then `leader`), timed from its decision. For rows timed from the \
         trigger, the floor is the failover floor's median new label (section *Failover \
         against its floor*) plus the handover floor's median: the medians of two runs added, \
         an estimate rather than a measured distribution, so only the p50 ratio is given.\n"
    );
    let _ = writeln!(
        md,
        "| trigger | until | n | p50 | p95 | p99 | max | floor p50 | p50 ratio | p99 ratio |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    let floor_notified = Summary::of(&r.floor.notified);
    for (cause, t) in &r.by_cause {
        let label_floor = failover
            .and_then(|f| f.floor.get(cause))
            .and_then(|c| Summary::of(&c.label));
        for (until, samples, floor_of) in FROM_TRIGGER {
            let floor =
                floor_of.and_then(|of| Some(label_floor?.p50 + Summary::of(of.samples(r))?.p50));
            row(md, trigger(*cause), until, samples(t), floor, None);
        }
        row(
            md,
            "new leader labelled",
            "new leader told `leader`",
            &t.label_to_notified,
            floor_notified.map(|f| f.p50),
            floor_notified.map(|f| f.p99),
        );
        row(
            md,
            "old leader's command stopped",
            "new leader's command started",
            &t.gap,
            None,
            None,
        );
    }
    row(
        md,
        "handover floor: decided",
        "new leader told `leader`",
        &r.floor.notified,
        None,
        None,
    );
    row(
        md,
        "handover floor: decided",
        "new leader's command started",
        &r.floor.started,
        None,
        None,
    );
    let _ = writeln!(md);
    if let Some(first) = r.first_activation {
        let _ = writeln!(
            md,
            "First leader command after the group was created: {} ms (a fresh operator \
             activates nobody until one term after it started: a process it never heard from \
             may still run).",
            ms(first)
        );
    }
    let _ = writeln!(
        md,
        "Leader commands: {} runs, {} overlapping pairs; handover floor {} runs, {} \
         overlapping pairs.",
        r.leader_runs,
        r.overlaps.len(),
        r.floor_runs,
        r.floor_overlaps.len()
    );
    for overlap in r.overlaps.iter().chain(&r.floor_overlaps) {
        let _ = writeln!(md, "- overlap: {overlap}");
    }
    if !r.sent.is_empty() {
        let _ = writeln!(
            md,
            "Notifications the operator sent (`podium_notifications_total`): {}.",
            r.sent
                .iter()
                .map(|(result, n)| format!("{result} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (cause, t) in &r.by_cause {
        for failure in &t.failures {
            let _ = writeln!(md, "- {}: {}", cause.describe(), one_line(failure));
        }
    }
    let _ = writeln!(md);
    match &r.tokens {
        Some(Ok(cost)) => token_cost(md, cost),
        Some(Err(e)) => {
            let _ = writeln!(md, "Token cost at scale failed: {}\n", one_line(e));
        }
        None => {}
    }
}

/// The token cost's table: one token per pod, so one TokenRequest per pod per token lifetime.
fn token_cost(md: &mut String, cost: &TokenCost) {
    let _ = writeln!(
        md,
        "### Token cost: {} groups with `spec.notify`, one pod each (TTL {} s)\n",
        cost.groups, cost.ttl_seconds
    );
    let _ = writeln!(
        md,
        "Each pod gets a token of its own (audience `podium.dev/notify/<ns>/<group>/<pod UID>`, \
         10 minutes, replaced with 2 minutes left), so the operator makes one TokenRequest per \
         pod when it first tells it its role and one per pod every 8 minutes after. The pods are \
         a responder on one loopback address that plays `podium exec`'s side without verifying \
         tokens: the operator's cost is measured, not the pods'.\n"
    );
    let _ = writeln!(md, "| row | value |");
    let _ = writeln!(md, "|---|--:|");
    let told = cost.all_told_leader.map_or("not reached".into(), |d| {
        format!("{:.1} s", d.as_secs_f64())
    });
    let _ = writeln!(
        md,
        "| every pod told `leader` after its group's creation | {told} |"
    );
    let _ = writeln!(
        md,
        "| TokenRequests until then | {} ({:.2} per pod) |",
        cost.startup_token_requests,
        cost.startup_token_requests as f64 / cost.groups.max(1) as f64
    );
    let _ = writeln!(
        md,
        "| TokenRequests in the next {} s | {} |",
        cost.window.as_secs(),
        cost.window_token_requests
    );
    let _ = writeln!(
        md,
        "| notifications answered in that window | {} ({:.1}/s) |",
        cost.window_messages,
        cost.window_messages as f64 / cost.window.as_secs_f64().max(0.001)
    );
    if let Some(per) = cost.cpu_per_message() {
        let _ = writeln!(
            md,
            "| operator CPU per notification in that window | {:.3} ms |",
            per.as_secs_f64() * 1000.0
        );
    }
    let _ = writeln!(
        md,
        "| TokenRequests per minute in steady state (derived: the count until then over a token's 8 minutes) | {:.0} |",
        cost.startup_token_requests as f64 / 8.0
    );
    let _ = writeln!(md);
}

/// One table row; `floor_p50`/`floor_p99` give the ratio columns.
fn row(
    md: &mut String,
    from: &str,
    until: &str,
    samples: &[Duration],
    floor_p50: Option<Duration>,
    floor_p99: Option<Duration>,
) {
    let Some(s) = Summary::of(samples) else {
        let _ = writeln!(md, "| {from} | {until} | 0 | – | – | – | – | – | – | – |");
        return;
    };
    let _ = writeln!(
        md,
        "| {from} | {until} | {} | {} | {} | {} | {} | {} | {} | {} |",
        s.n,
        ms(s.p50),
        ms(s.p95),
        ms(s.p99),
        ms(s.max),
        floor_p50.map_or("–".into(), ms),
        times(ratio_of(Some(s.p50), floor_p50)),
        times(ratio_of(Some(s.p99), floor_p99)),
    );
}

/// The goal rows: told `leader` within [`LABEL_TO_NOTIFIED_GOAL`] of the label at p99, and no
/// two leader commands at once.
pub fn goals(md: &mut String, result: Option<&Result<NotifyResults, String>>) {
    let mark = |ok: bool| if ok { "yes" } else { "**no**" };
    let goal_ms = LABEL_TO_NOTIFIED_GOAL.as_millis();
    match result {
        Some(Ok(r)) => {
            for (cause, t) in &r.by_cause {
                let what = format!(
                    "{}: new leader told `leader` after its label, p99",
                    trigger(*cause)
                );
                match Summary::of(&t.label_to_notified) {
                    Some(s) => {
                        let _ = writeln!(
                            md,
                            "| {what} | < {goal_ms} ms | {} ms | {} |",
                            ms(s.p99),
                            mark(s.p99 < LABEL_TO_NOTIFIED_GOAL)
                        );
                    }
                    None => {
                        let _ = writeln!(md, "| {what} | < {goal_ms} ms | not measured | – |");
                    }
                }
            }
            let _ = writeln!(
                md,
                "| leader commands running at once | never | {} overlaps in {} runs | {} |",
                r.overlaps.len(),
                r.leader_runs,
                mark(r.overlaps.is_empty())
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(
                md,
                "| role notifications | told < {goal_ms} ms after the label, no overlap | failed: {} | **no** |",
                one_line(e)
            );
        }
        None => {}
    }
}

/// Why the section counts as failed, if it does: an error, or leader commands that overlapped.
pub fn failure(result: &Result<NotifyResults, String>) -> Option<String> {
    match result {
        Err(e) => Some(e.clone()),
        Ok(r) if !r.overlaps.is_empty() || !r.floor_overlaps.is_empty() => Some(format!(
            "leader commands overlapped: {}",
            r.overlaps
                .iter()
                .chain(&r.floor_overlaps)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::Cause;

    fn results() -> NotifyResults {
        let ms = Duration::from_millis;
        let mut r = NotifyResults::default();
        r.by_cause.insert(
            Cause::Deleted,
            TriggerResults {
                label: vec![ms(40), ms(50)],
                old_stopped: vec![ms(30), ms(35)],
                notified: vec![ms(60), ms(70)],
                started: vec![ms(65), ms(75)],
                label_to_notified: vec![ms(20), ms(120)],
                gap: vec![ms(30), ms(40)],
                failures: Vec::new(),
            },
        );
        r.floor.notified = vec![ms(10), ms(12)];
        r.floor.started = vec![ms(14), ms(16)];
        r.leader_runs = 5;
        r
    }

    #[test]
    fn rows_ratios_and_goals() {
        let r = Ok(results());
        let mut md = String::new();
        section(&mut md, &r, None);
        assert!(
            md.contains("| new leader labelled | new leader told `leader` | 2 | 20 | 120 | 120 | 120 | 10 | 2.00× | 10.00× |"),
            "{md}"
        );
        // Without the failover floor, rows from the trigger have no floor.
        assert!(md.contains("| leader pod deleted | new leader's command started | 2 | 65 | 75 | 75 | 75 | – | – | – |"), "{md}");
        let mut goals_md = String::new();
        goals(&mut goals_md, Some(&r));
        assert!(goals_md.contains("| 120 ms | **no** |"), "{goals_md}");
        assert!(
            goals_md.contains("| 0 overlaps in 5 runs | yes |"),
            "{goals_md}"
        );
        assert_eq!(failure(&r), None);
        let mut overlapped = results();
        overlapped
            .overlaps
            .push("a (epoch 1) still ran when b (epoch 2) started".into());
        assert!(failure(&Ok(overlapped)).is_some_and(|f| f.contains("a (epoch 1)")));
    }
}
