//! The report's floor tables: each Podium figure next to the floor measured in the same run,
//! and their ratio, which is what a run on another machine should reproduce.

use std::fmt::Write as _;
use std::time::Duration;

use crate::failover::{Cause, CauseResults, FailoverResults};
use crate::scale::ScaleResults;
use crate::stats::{Summary, ms};

/// `podium ÷ floor`, `–` where either is missing.
pub fn ratio_of(podium: Option<Duration>, floor: Option<Duration>) -> Option<f64> {
    match (podium, floor) {
        (Some(p), Some(f)) if !f.is_zero() => Some(p.as_secs_f64() / f.as_secs_f64()),
        _ => None,
    }
}

/// `1.18×`: two decimals, as the goals are 1.25× and 1.3×.
pub fn times(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

/// Which samples of a cause's results a row shows.
type Samples = fn(&CauseResults) -> &[Duration];

/// What each "until" of the failover-floor table reads from a cause's results.
const UNTIL: &[(&str, Samples)] = &[
    ("new leader labelled", |r| &r.label),
    ("Service routes only to it", |r| &r.service),
];

pub fn trigger(cause: Cause) -> &'static str {
    match cause {
        Cause::Deleted => "leader pod deleted",
        Cause::NotReady => "leader Ready=False",
    }
}

/// Podium's p50 and p99 ratios to the floor for `cause`, new leader labelled.
pub fn failover_ratios(f: &FailoverResults, cause: Cause) -> Option<(f64, f64)> {
    let podium = Summary::of(&f.by_cause.get(&cause)?.label)?;
    let floor = Summary::of(&f.floor.get(&cause)?.label)?;
    Some((
        ratio_of(Some(podium.p50), Some(floor.p50))?,
        ratio_of(Some(podium.p99), Some(floor.p99))?,
    ))
}

pub fn failover(md: &mut String, f: &FailoverResults) {
    let _ = writeln!(md, "## Failover against its floor\n");
    let _ = writeln!(
        md,
        "The floor is a bare client on the same group, pods and triggers, taking turns with \
         Podium round by round (the operator child stopped with SIGSTOP while the floor \
         answers, so both see the same background load): on the watch event that makes the leader ineligible it sends the \
         protocol's sequential writes (fence the old leader, Lease compare-and-swap naming the \
         new one with leaseTransitions + 1, promote the new leader, status), with versions from \
         its own watch cache and no reads. Both are timed from the harness's trigger to the \
         harness's own watch; *last write acknowledged* is the floor's status write answered.\n"
    );
    let _ = writeln!(
        md,
        "| trigger | until | Podium p50 | floor p50 | p50 ratio | Podium p99 | floor p99 | p99 ratio | n (Podium / floor) |"
    );
    let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for (cause, podium) in &f.by_cause {
        let Some(floor) = f.floor.get(cause) else {
            continue;
        };
        for (until, samples) in UNTIL {
            let (p, fl) = (Summary::of(samples(podium)), Summary::of(samples(floor)));
            let cell = |s: Option<Summary>, pick: fn(&Summary) -> Duration| {
                s.as_ref().map_or("–".into(), |s| ms(pick(s)))
            };
            let _ = writeln!(
                md,
                "| {} | {until} | {} | {} | {} | {} | {} | {} | {} / {} |",
                trigger(*cause),
                cell(p, |s| s.p50),
                cell(fl, |s| s.p50),
                times(ratio_of(p.map(|s| s.p50), fl.map(|s| s.p50))),
                cell(p, |s| s.p99),
                cell(fl, |s| s.p99),
                times(ratio_of(p.map(|s| s.p99), fl.map(|s| s.p99))),
                samples(podium).len(),
                samples(floor).len(),
            );
        }
        let acked = Summary::of(&floor.acked);
        let _ = writeln!(
            md,
            "| {} | floor: last write acknowledged | | {} | | | {} | | – / {} |",
            trigger(*cause),
            acked.map_or("–".into(), |s| ms(s.p50)),
            acked.map_or("–".into(), |s| ms(s.p99)),
            floor.acked.len(),
        );
    }
    let _ = writeln!(md);
    for (cause, r) in &f.floor {
        for failure in &r.failures {
            let _ = writeln!(md, "- floor, {}: {failure}", cause.describe());
        }
    }
    if f.floor_failed_writes > 0 {
        let _ = writeln!(
            md,
            "- the floor had {} writes answered other than 2xx (a fence of a deleted pod already \
             gone is a 404, as for Podium)",
            f.floor_failed_writes
        );
    }
    let _ = writeln!(md);
}

/// Podium's all-elected time over the floor's.
pub fn election_ratio(r: &ScaleResults) -> Option<f64> {
    ratio_of(r.elected_after, r.floor.as_ref()?.elected_after)
}

/// Podium's CPU per steady-state write over the bare renewer's CPU per renewal.
pub fn cpu_ratio(r: &ScaleResults) -> Option<f64> {
    ratio_of(
        r.cpu_per_write(),
        r.floor.as_ref()?.renewals.cpu_per_renewal(),
    )
}

pub fn scale(md: &mut String, results: &[(usize, Result<ScaleResults, String>)]) {
    let ok: Vec<&ScaleResults> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    if ok.is_empty() {
        return;
    }
    let _ = writeln!(md, "## Scale against its floor\n");
    let _ = writeln!(
        md,
        "Before each G step's operator starts, on the same pods: the *election floor* (a bare \
         client watching groups and pods that, for each new group, creates the Lease, labels the \
         leader and the followers and writes the status, at most 64 groups at a time as the \
         operator's reconciles) with the groups created exactly as for Podium, both timed from \
         the first create to the harness's watch showing one leader in every group; then the \
         *renewal floor* (a bare client on a thread of its own renewing every Lease each TTL/2, \
         each replace conditional on its previous answer's version) over the same settle time \
         and window as Podium's; then everything the floors wrote is undone.\n"
    );
    let _ = writeln!(
        md,
        "| G | Podium all elected | floor all elected | election ratio | election writes/group (Podium / floor) | steady writes/s (Podium / renewer / G÷(TTL/2)) | writes ratio | CPU ms per renewal (Podium / renewer) | CPU ratio |"
    );
    let _ = writeln!(md, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in ok {
        let secs = |d: Option<Duration>| {
            d.map_or("not all".into(), |d| format!("{:.2} s", d.as_secs_f64()))
        };
        let per_ms = |d: Option<Duration>| {
            d.map_or("–".into(), |d| format!("{:.3}", d.as_secs_f64() * 1000.0))
        };
        let g = r.groups;
        match &r.floor {
            Some(fl) => {
                let _ = writeln!(
                    md,
                    "| {g} | {} | {} | {} | {:.2} / {:.2} | {:.1} / {:.1} / {:.1} | {:.2}× | {} / {} | {} |",
                    secs(r.elected_after),
                    secs(fl.elected_after),
                    times(election_ratio(r)),
                    r.election_requests.writes() as f64 / g as f64,
                    fl.election_writes as f64 / g as f64,
                    r.writes_per_second(),
                    fl.renewals.writes_per_second(),
                    r.floor_writes_per_second(),
                    r.writes_per_second() / r.floor_writes_per_second(),
                    per_ms(r.cpu_per_write()),
                    per_ms(fl.renewals.cpu_per_renewal()),
                    times(cpu_ratio(r)),
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {g} | {} | not measured | – | | | | | – |",
                    secs(r.elected_after)
                );
            }
        }
    }
    let _ = writeln!(md);
    for r in results.iter().filter_map(|(_, r)| r.as_ref().ok()) {
        if let Some(fl) = &r.floor {
            let _ = writeln!(
                md,
                "- G={}: floor groups created in {:.2} s; {} election writes ({} not 2xx); renewer: {} Leases, {} renewals acknowledged in the {:.0} s window ({} failed), {:.3} s CPU; floor undone in {:.1} s.",
                r.groups,
                fl.groups_created_in.as_secs_f64(),
                fl.election_writes,
                fl.failed_writes,
                fl.renewals.leases,
                fl.renewals.renewed,
                fl.renewals.window.as_secs_f64(),
                fl.renewals.failed,
                fl.renewals.cpu.as_secs_f64(),
                fl.undone_in.as_secs_f64(),
            );
            if let Some(e) = &fl.undo_failed {
                let _ = writeln!(md, "- G={}, floor: undoing it failed: {e}", r.groups);
            }
            if let Some(retried) = &fl.retried {
                let _ = writeln!(md, "- G={}, floor: {retried}", r.groups);
            }
        }
        if let Some(took) = r.groups_deleted_in {
            let _ = writeln!(
                md,
                "- G={}: every group deleted with the operator running, all cleaned up (labels stripped, Leases deleted) and gone in {:.1} s{}.",
                r.groups,
                took.as_secs_f64(),
                r.floor
                    .as_ref()
                    .map(|fl| format!(" (the floor's undo: {:.1} s)", fl.undone_in.as_secs_f64()))
                    .unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(md);
}
