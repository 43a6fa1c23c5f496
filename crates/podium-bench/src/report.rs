//! The Markdown report.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use super::Settings;
use super::failover::{COST_ROWS, Cause, FailoverResults, floor};
use super::floor::report as floor_report;
use super::notify::NotifyResults;
use super::notify::report as notify_report;
use super::peers::{PeerConfig, PeerResults};
use super::procstat::Machine;
use super::scale::ScaleResults;
use super::stats::{Summary, median, ms};

const MIB: f64 = 1024.0 * 1024.0;

pub struct Report {
    pub settings: Settings,
    pub machine: Machine,
    pub started_at: jiff::Zoned,
    pub duration: Duration,
    pub load_end: String,
    /// The highest 1-minute load average sampled during the run.
    pub load_peak: f64,
    pub apiserver_version: String,
    pub etcd_version: String,
    pub operator_mode: String,
    /// The git commit the bench ran from, if it can tell.
    pub source: String,
    pub failover: Option<Result<FailoverResults, String>>,
    pub notify: Option<Result<NotifyResults, String>>,
    pub peers: Vec<(PeerConfig, Result<PeerResults, String>)>,
    pub scale: Vec<(usize, Result<ScaleResults, String>)>,
}

impl Report {
    pub fn new(settings: &Settings, machine: Machine, started_at: jiff::Zoned) -> Report {
        Report {
            settings: settings.clone(),
            machine,
            started_at,
            duration: Duration::ZERO,
            load_end: String::new(),
            load_peak: 0.0,
            apiserver_version: String::new(),
            etcd_version: String::new(),
            operator_mode: String::new(),
            source: String::new(),
            failover: None,
            notify: None,
            peers: Vec::new(),
            scale: Vec::new(),
        }
    }

    /// Sections that failed, as `section: error`.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(Err(e)) = &self.failover {
            out.push(format!("failover: {e}"));
        }
        if let Some(failure) = self.notify.as_ref().and_then(notify_report::failure) {
            out.push(format!("role notifications: {failure}"));
        }
        for (config, result) in &self.peers {
            if let Err(e) = result {
                out.push(format!("{}: {e}", config.title));
            }
        }
        for (g, result) in &self.scale {
            if let Err(e) = result {
                out.push(format!("scale G={g}: {e}"));
            }
        }
        out
    }

    pub fn render(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.latency(&mut md);
        if let Some(Ok(f)) = &self.failover {
            floor_report::failover(&mut md, f);
        }
        if let Some(notify) = &self.notify {
            let failover = self.failover.as_ref().and_then(|f| f.as_ref().ok());
            notify_report::section(&mut md, notify, failover);
        }
        self.scale_section(&mut md);
        floor_report::scale(&mut md, &self.scale);
        self.cost(&mut md);
        self.goals(&mut md);
        self.notes(&mut md);
        md
    }

    fn header(&self, md: &mut String) {
        let m = &self.machine;
        let s = &self.settings;
        title_and_machine(md, "podium bench", &self.started_at, s.quick, m);
        let _ = writeln!(
            md,
            "| control plane | kube-apiserver {}, etcd {}, kube-controller-manager (testbed, loopback) |",
            self.apiserver_version, self.etcd_version
        );
        let _ = writeln!(
            md,
            "| podium | {} ({} build), source {} |",
            env!("CARGO_PKG_VERSION"),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            self.source
        );
        let _ = writeln!(md, "| operator | {} |", self.operator_mode);
        load_row(md, m, &self.load_end, self.load_peak);
        let _ = writeln!(
            md,
            "| settings | {} failovers per trigger (notifications: TTL {} s); peers: {} crash + {} step-down rounds; scale: G ∈ {{{}}}, TTL {} s, {:.0} s window, {} failovers |",
            s.rounds,
            s.notify_ttl_seconds,
            s.peer_crash_rounds,
            s.peer_graceful_rounds,
            s.groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            s.scale_ttl_seconds,
            s.window.as_secs_f64(),
            s.scale_rounds
        );
        let _ = writeln!(md, "| run time | {:.0} s |\n", self.duration.as_secs_f64());
    }

    fn podium_baseline(&self) -> Option<Summary> {
        let Some(Ok(f)) = &self.failover else {
            return None;
        };
        Summary::of(&f.by_cause.get(&Cause::Deleted)?.label)
    }

    fn latency(&self, md: &mut String) {
        let _ = writeln!(md, "## Failover latency: Podium and the peers\n");
        let _ = writeln!(
            md,
            "Milliseconds from the harness's write (pod delete, Ready=False status patch) or the \
             holder's crash/step-down to the outcome, seen through the harness's own watches. \
             Ratios are against Podium's *leader pod deleted → new leader labelled* row.\n"
        );
        let _ = writeln!(
            md,
            "| mechanism | trigger | until | n | p50 | p95 | p99 | max | p50 ratio | p99 ratio |"
        );
        let _ = writeln!(md, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|");
        let base = self.podium_baseline();
        let row = |md: &mut String, who: &str, trigger: &str, until: &str, samples: &[Duration]| {
            match Summary::of(samples) {
                Some(s) => {
                    let ratio = |a: Duration, b: Option<Duration>| match b {
                        Some(b) if !b.is_zero() => ratio(a.as_secs_f64() / b.as_secs_f64()),
                        _ => "–".into(),
                    };
                    let _ = writeln!(
                        md,
                        "| {who} | {trigger} | {until} | {} | {} | {} | {} | {} | {} | {} |",
                        s.n,
                        ms(s.p50),
                        ms(s.p95),
                        ms(s.p99),
                        ms(s.max),
                        ratio(s.p50, base.map(|b| b.p50)),
                        ratio(s.p99, base.map(|b| b.p99)),
                    );
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {who} | {trigger} | {until} | 0 | – | – | – | – | – | – |"
                    );
                }
            }
        };
        match &self.failover {
            Some(Ok(f)) => {
                for (cause, r) in &f.by_cause {
                    let trigger = match cause {
                        Cause::Deleted => "leader pod deleted",
                        Cause::NotReady => "leader Ready=False",
                    };
                    row(md, "Podium", trigger, "new leader labelled", &r.label);
                    row(
                        md,
                        "Podium",
                        trigger,
                        "Service routes only to it",
                        &r.service,
                    );
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(md, "| Podium | – | failed: {} | | | | | | | |", one_line(e));
            }
            None => {}
        }
        for (config, result) in &self.peers {
            let who = format!("{} ({})", config.title, config.timings());
            match result {
                Ok(r) => {
                    row(
                        md,
                        &who,
                        "holder crashed (no step-down)",
                        "another candidate holds the Lease",
                        &r.crash,
                    );
                    row(
                        md,
                        &who,
                        "holder stepped down",
                        "another candidate holds the Lease",
                        &r.graceful,
                    );
                }
                Err(e) => {
                    let _ = writeln!(md, "| {who} | – | failed: {} | | | | | | | |", one_line(e));
                }
            }
        }
        let _ = writeln!(md);
        if let Some(Ok(f)) = &self.failover {
            if let Some((count, sum)) = f.operator_histogram
                && count > 0
            {
                let _ = writeln!(
                    md,
                    "Inside the operator (`podium_failover_seconds`, from seeing the old leader \
                     ineligible to the new label acknowledged): {count} failovers, mean {} ms.",
                    ms(Duration::from_secs_f64(sum / count as f64))
                );
            }
            if let Some(first) = f.first_election {
                let _ = writeln!(
                    md,
                    "First election (group created → leader labelled): {} ms.",
                    ms(first)
                );
            }
            for (cause, r) in &f.by_cause {
                for failure in &r.failures {
                    let _ = writeln!(md, "- {}: {failure}", cause.describe());
                }
            }
        }
        for (config, result) in &self.peers {
            if let Ok(r) = result {
                let _ = writeln!(
                    md,
                    "{}: in {} of {} rounds a second candidate also acquired the Lease (its \
                     merge-patch writes are unconditional), so two candidates believed they led \
                     until the loser's next renewal.{}",
                    config.title,
                    r.double_acquisitions,
                    r.crash.len() + r.graceful.len(),
                    r.failures
                        .iter()
                        .map(|f| format!(" Failed: {f}."))
                        .collect::<String>()
                );
            }
        }
        let _ = writeln!(md);
    }

    fn scale_section(&self, md: &mut String) {
        if self.scale.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Scale: G groups × 3 pods, one namespace\n");
        let _ = writeln!(
            md,
            "| G | pods created | groups created | all elected after | steady writes/s | floor G/(TTL/2) | writes ÷ floor | steady reads/s | API server writes/s (all clients) | operator CPU s/min | % of a core | peak RSS MiB | failover p50 / p99 / max ms (n) |"
        );
        let _ = writeln!(md, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        for (g, result) in &self.scale {
            match result {
                Ok(r) => {
                    let secs = r.window.as_secs_f64();
                    let failover = match Summary::of(&r.failover) {
                        Some(s) => {
                            format!("{} / {} / {} ({})", ms(s.p50), ms(s.p99), ms(s.max), s.n)
                        }
                        None => "–".into(),
                    };
                    let _ = writeln!(
                        md,
                        "| {g} | {} in {:.1} s | {:.1} s | {} | {:.1} | {:.1} | {:.2} | {:.1} | {} | {:.2} | {:.1}% | {:.1} | {failover} |",
                        g * 3,
                        r.pods_created_in.as_secs_f64(),
                        r.groups_created_in.as_secs_f64(),
                        match r.elected_after {
                            Some(t) => format!("{:.2} s", t.as_secs_f64()),
                            None => format!("**not all**: {}/{g}", r.elected_groups),
                        },
                        r.writes_per_second(),
                        r.floor_writes_per_second(),
                        r.writes_per_second() / r.floor_writes_per_second(),
                        r.window_requests.reads() as f64 / secs,
                        r.apiserver_writes
                            .map_or("–".into(), |w| format!("{:.1}", w as f64 / secs)),
                        r.cpu_seconds_per_minute(),
                        r.cpu_seconds_per_minute() / 60.0 * 100.0,
                        r.peak_rss as f64 / MIB,
                    );
                }
                Err(e) => {
                    let _ = writeln!(md, "| {g} | failed: {} |||||||||||", one_line(e));
                }
            }
        }
        let _ = writeln!(md);
        let ok: Vec<&ScaleResults> = self
            .scale
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .collect();
        if ok.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "Steady-state requests by verb and resource (per second over the window), and the \
             election's requests (per group, creation start → all elected). The control plane's \
             CPU over the same window is for context.\n"
        );
        let kinds: BTreeSet<&String> = ok
            .iter()
            .flat_map(|r| {
                r.window_requests
                    .by_kind
                    .keys()
                    .chain(r.election_requests.by_kind.keys())
            })
            .filter(|k| !k.starts_with("watch "))
            .collect();
        let _ = write!(md, "| request |");
        for r in &ok {
            let _ = write!(
                md,
                " G={} steady /s | G={} election /group |",
                r.groups, r.groups
            );
        }
        let _ = writeln!(md);
        let _ = writeln!(md, "|---|{}", "--:|--:|".repeat(ok.len()));
        for kind in kinds {
            let _ = write!(md, "| `{kind}` |");
            for r in &ok {
                let steady = r.window_requests.by_kind.get(kind).copied().unwrap_or(0);
                let election = r.election_requests.by_kind.get(kind).copied().unwrap_or(0);
                let _ = write!(
                    md,
                    " {:.2} | {:.2} |",
                    steady as f64 / r.window.as_secs_f64(),
                    election as f64 / r.groups as f64
                );
            }
            let _ = writeln!(md);
        }
        let _ = write!(md, "| non-2xx answers |");
        for r in &ok {
            let _ = write!(
                md,
                " {} | {} |",
                r.window_requests.errors.values().sum::<u64>(),
                r.election_requests.errors.values().sum::<u64>()
            );
        }
        let _ = writeln!(md);
        let _ = write!(md, "| operator CPU, s |");
        for r in &ok {
            let _ = write!(
                md,
                " {:.2} | {:.2} (total) |",
                r.window_cpu.as_secs_f64(),
                r.election_cpu.as_secs_f64()
            );
        }
        let _ = writeln!(md);
        let _ = write!(md, "| kube-apiserver / etcd CPU, s/min |");
        for r in &ok {
            let per_min = |d: Option<Duration>| {
                d.map_or("–".into(), |d| {
                    format!("{:.1}", d.as_secs_f64() * 60.0 / r.window.as_secs_f64())
                })
            };
            let _ = write!(
                md,
                " {} / {} | |",
                per_min(r.apiserver_cpu),
                per_min(r.etcd_cpu)
            );
        }
        let _ = writeln!(md, "\n");
        for r in &ok {
            for f in &r.failures {
                let _ = writeln!(md, "- G={}: {f}", r.groups);
            }
            if !r.election_requests.errors.is_empty() {
                let _ = writeln!(
                    md,
                    "- G={}: non-2xx answers while electing: {}",
                    r.groups,
                    error_list(&r.election_requests.errors)
                );
            }
            if !r.window_requests.errors.is_empty() {
                let _ = writeln!(
                    md,
                    "- G={}: non-2xx answers in the steady window: {}",
                    r.groups,
                    error_list(&r.window_requests.errors)
                );
            }
            if r.max_multi_leader_groups > 0 {
                let _ = writeln!(
                    md,
                    "- G={}: up to {} groups showed two leader labels at once in the harness's watch",
                    r.groups, r.max_multi_leader_groups
                );
            }
        }
        let _ = writeln!(md);
    }

    fn cost(&self, md: &mut String) {
        let Some(Ok(f)) = &self.failover else {
            return;
        };
        let _ = writeln!(
            md,
            "## Cost per failover (API requests the operator made)\n"
        );
        let _ = writeln!(
            md,
            "Median per failover (min–max), counted by the counting layer on the operator's \
             client from the trigger until the operator had been idle for 500 ms. A deleted \
             leader's window also holds the Deployment's replacement pod joining (its follower \
             label and member-count status writes).\n"
        );
        let causes: Vec<(&Cause, &super::failover::CauseResults)> = f.by_cause.iter().collect();
        let _ = write!(md, "| request |");
        for (cause, r) in &causes {
            let _ = write!(md, " {} (n={}) |", cause.describe(), r.costs.len());
        }
        let _ = writeln!(md, " floor |");
        let _ = writeln!(md, "|---|{}--:|", "--:|".repeat(causes.len()));
        for (key, title) in COST_ROWS {
            let _ = write!(md, "| {title} |");
            for (_, r) in &causes {
                let values: Vec<u64> = r
                    .costs
                    .iter()
                    .map(|c| c.get(key).copied().unwrap_or(0))
                    .collect();
                let (lo, hi) = (
                    values.iter().min().copied().unwrap_or(0),
                    values.iter().max().copied().unwrap_or(0),
                );
                let range = if lo == hi {
                    String::new()
                } else {
                    format!(" ({lo}–{hi})")
                };
                let _ = write!(md, " {}{range} |", median(&values));
            }
            let _ = writeln!(
                md,
                " {} |",
                floor(key).map_or("–".into(), |f| f.to_string())
            );
        }
        let _ = writeln!(md);
        for (cause, r) in &causes {
            if !r.errors.is_empty() {
                let _ = writeln!(
                    md,
                    "Non-2xx answers over all {} rounds ({}): {}.",
                    r.costs.len(),
                    cause.describe(),
                    error_list(&r.errors)
                );
            }
        }
        let _ = writeln!(md);
    }

    fn goals(&self, md: &mut String) {
        let _ = writeln!(md, "## Goals (stated, not asserted)\n");
        let _ = writeln!(
            md,
            "Ratios to the floors measured in this run on this control plane (see the floor \
             tables); absolute times hold on this machine only.\n"
        );
        let _ = writeln!(md, "| goal | target | measured | met |");
        let _ = writeln!(md, "|---|---|---|:-:|");
        let mark = |ok: bool| if ok { "yes" } else { "**no**" };
        match &self.failover {
            Some(Ok(f)) => {
                for cause in [Cause::Deleted, Cause::NotReady] {
                    let what = format!("failover, {} → new label", floor_report::trigger(cause));
                    match floor_report::failover_ratios(f, cause) {
                        Some((p50, p99)) => {
                            let _ = writeln!(
                                md,
                                "| {what}, p50 | ≤ 1.25× floor | {} | {} |",
                                floor_report::times(Some(p50)),
                                mark(p50 <= 1.25)
                            );
                            let _ = writeln!(
                                md,
                                "| {what}, p99 | ≤ 2× floor | {} | {} |",
                                floor_report::times(Some(p99)),
                                mark(p99 <= 2.0)
                            );
                        }
                        None => {
                            let _ = writeln!(
                                md,
                                "| {what} | p50 ≤ 1.25×, p99 ≤ 2× floor | not measured | – |"
                            );
                        }
                    }
                }
            }
            _ => {
                let _ = writeln!(
                    md,
                    "| failover latency | p50 ≤ 1.25×, p99 ≤ 2× floor | not measured | – |"
                );
            }
        }
        notify_report::goals(md, self.notify.as_ref());
        for (g, rss_goal_mib) in [(1000, 100.0), (10_000, 300.0)] {
            let at = self.scale.iter().find_map(|(n, r)| (*n == g).then_some(r));
            match at {
                Some(Ok(r)) => self.scale_goals(md, r, rss_goal_mib),
                Some(Err(e)) => {
                    let _ = writeln!(
                        md,
                        "| {g} groups | election, writes, CPU, RSS | failed: {} | **no** |",
                        one_line(e)
                    );
                }
                None if g == 1000 => {
                    let _ = writeln!(
                        md,
                        "| 1000 groups | election ≤ 1.3× floor, writes = floor, CPU ≤ 1.5× renewer, RSS ≤ 100 MiB | not run (G=1000 not in --groups) | – |"
                    );
                }
                None => {}
            }
        }
        let _ = writeln!(md);
    }

    fn scale_goals(&self, md: &mut String, r: &ScaleResults, rss_goal_mib: f64) {
        let mark = |ok: bool| if ok { "yes" } else { "**no**" };
        let g = r.groups;
        let election = floor_report::election_ratio(r);
        let _ = writeln!(
            md,
            "| {g} groups elected, from the first create | {} | {} (Podium {}, floor {} on this machine) | {} |",
            if g == 1000 {
                "≤ 1.3× floor"
            } else {
                "(no goal; reported)"
            },
            floor_report::times(election),
            r.elected_after
                .map_or("not all".into(), |t| format!("{:.2} s", t.as_secs_f64())),
            r.floor
                .as_ref()
                .and_then(|f| f.elected_after)
                .map_or("–".into(), |t| format!("{:.2} s", t.as_secs_f64())),
            if g == 1000 {
                mark(election.is_some_and(|e| e <= 1.3))
            } else {
                "–"
            }
        );
        let writes = r.writes_per_second() / r.floor_writes_per_second();
        let _ = writeln!(
            md,
            "| steady-state writes at {g} groups | = floor G/(TTL/2) = {:.1}/s (± 5 %) | {:.1}/s ({:.2}×) | {} |",
            r.floor_writes_per_second(),
            r.writes_per_second(),
            writes,
            // Below the floor is not better: renewals that fall behind put Leases at risk.
            mark((0.95..=1.05).contains(&writes))
        );
        let cpu = floor_report::cpu_ratio(r);
        let _ = writeln!(
            md,
            "| operator CPU per renewal at {g} groups (steady state) | ≤ 1.5× bare renewer | {} ({:.1}% of a core on this machine) | {} |",
            floor_report::times(cpu),
            r.cpu_seconds_per_minute() / 60.0 * 100.0,
            mark(cpu.is_some_and(|c| c <= 1.5))
        );
        let _ = writeln!(
            md,
            "| operator peak RSS at {g} groups | ≤ {rss_goal_mib:.0} MiB | {:.1} MiB | {} |",
            r.peak_rss as f64 / MIB,
            mark(r.peak_rss as f64 <= rss_goal_mib * MIB)
        );
    }

    fn notes(&self, md: &mut String) {
        let s = &self.settings;
        let _ = writeln!(md, "## How this was measured\n");
        let mut notes = vec![
            "Percentiles are nearest-rank over the rounds run; with fewer than 100 samples p99 is the maximum.".to_string(),
            format!(
                "Podium: one ElectionGroup (TTL {} s) over a Deployment of 4 pause pods with a Service selecting `app` and `podium.dev/role: leader`; a simulated kubelet readies pods and finalises deletions at once. Each round starts settled (4 Ready, labelled pods, status 4/4 eligible, Service on the leader, operator idle 500 ms). NotReady rounds patch Ready=False with `set_pod_not_ready` (the clock starts before its read of the pod) and make the pod Ready again afterwards.",
                super::failover::LEASE_SECONDS
            ),
            "Latency ends when the harness's own watch (not the operator's) delivered the change: the time is stamped when the watched value last changed, so a late waiter does not add to it.".to_string(),
            "Peers: four candidate tasks in the bench process racing for one `coordination.k8s.io/v1` Lease with kube-leader-election 0.44's `LeaseLock::try_acquire_or_renew`; a crash is the holder's task aborted with no step-down, a graceful exit is `LeaseLock::step_down` (holder cleared, leaseDurationSeconds 1). Each round starts at a random point of the renewal cycle; the departed candidate is replaced by a new one (a new pod name).".to_string(),
            "client-go model: the same `LeaseLock`, TTL = leaseDuration 15 s; the holder renews every retryPeriod (2 s) as client-go's renew loop does; a non-holder retries every retryPeriod × (1 + U[0, 1.2)) as client-go's `wait.JitterUntil(retryPeriod, 1.2)` does. Not modelled: renewDeadline (10 s: a holder that cannot renew for 10 s gives up; irrelevant with a healthy API server); client-go judging expiry from the local time it last saw the record change rather than the Lease's renewTime (in client-go a candidate's clock starts up to one retry period later, so the model is slightly optimistic for client-go); client-go acquiring a released Lease (empty holder) at its next retry while `LeaseLock` waits for the 1 s leaseDuration a step-down writes; client-go's conditional update (resourceVersion) where `LeaseLock` merge-patches.".to_string(),
            format!(
                "Scale: pods are created directly, bound to one node (`spec.nodeName`) and given a Running/Ready status, {} API calls at a time; then a fresh operator starts (watching that namespace only, as `--watch-namespace` would) and all groups are created ({} at a time). \"All elected\" is when the harness's watch of `podium.dev/role=leader` pods shows exactly one per group. The steady-state window starts TTL/2 + 2 s after that.",
                32, 32
            ),
            "Floors: the failover floor answers every other trigger on the same group and pods (Podium's round, then the floor's with the operator child stopped by SIGSTOP; with `--in-process-operator`, all of the floor's rounds after Podium's), after one unrecorded warm-up round of each per trigger; the election and renewal floors run before each G step's operator, on the same pods, and are undone (groups and Leases deleted, labels stripped) before it starts. The floors send podium's own write bodies through podium's write functions (`podium::labels::apply`, `podium::lease::write`, `podium::status::write`), with a status of leader, epoch and counts only (no conditions), and write no Events. The renewer's CPU is its thread's (`/proc/thread-self/stat`, a single-threaded runtime), Podium's is its whole process's.".to_string(),
            "Requests are counted by the counting layer on the operator's own client (every request, watches listed apart and not counted as reads); the API server's `apiserver_request_total` writes to leases, pods, electiongroups and events over the same window (all clients, the harness idle) is given as a cross-check.".to_string(),
            "Operator CPU is utime + stime of the operator's process over the window (/proc/<pid>/stat); peak RSS is its VmHWM (/proc/<pid>/status) at the end of the G step, after the failovers.".to_string(),
        ];
        if s.quick {
            notes.push("--quick: peer TTLs and periods are a fifth of the real ones (TTL 3 s), scale TTL 4 s, a 4 s window and few rounds.".into());
        }
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        let failures = self.failures();
        if !failures.is_empty() {
            let _ = writeln!(md, "\n## Failures\n");
            for f in failures {
                let _ = writeln!(md, "- {}", one_line(&f));
            }
        }
    }
}

/// A report's title (marked as not for quoting with `--quick`) and the first rows of its header
/// table: the machine.
pub(crate) fn title_and_machine(
    md: &mut String,
    title: &str,
    started_at: &jiff::Zoned,
    quick: bool,
    m: &Machine,
) {
    let _ = writeln!(
        md,
        "# {title}, {}{}\n",
        started_at.strftime("%Y-%m-%d %H:%M %Z"),
        if quick {
            " (--quick: smoke run, not for quoting)"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| machine | {} × {} |", m.cores, m.cpu_model);
    let _ = writeln!(
        md,
        "| memory | {:.1} GiB |",
        m.memory_bytes as f64 / MIB / 1024.0
    );
    let _ = writeln!(md, "| kernel | Linux {} |", m.kernel);
}

/// The header row for the load average: other work on the machine shows up here.
pub(crate) fn load_row(md: &mut String, m: &Machine, load_end: &str, load_peak: f64) {
    let _ = writeln!(
        md,
        "| load average (1/5/15 min) | {} at start, {load_end} at end; 1-min peak during the run {load_peak:.1} on {} cores |",
        m.load_average, m.cores
    );
}

/// `1.3×`, `54×`.
pub(crate) fn ratio(r: f64) -> String {
    if r < 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.0}×")
    }
}

/// `kind ×n` for each non-2xx answer kind.
fn error_list(errors: &std::collections::BTreeMap<String, u64>) -> String {
    errors
        .iter()
        .map(|(k, n)| format!("`{k}` ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn one_line(s: &str) -> String {
    s.replace(['\n', '|'], " ")
}
