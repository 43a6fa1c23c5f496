//! `podium status`: what the operator last recorded for one group or all of them.

use std::fmt::Write;

use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::cli::StatusArgs;
use crate::crd::ElectionGroup;

pub async fn run(client: Client, args: &StatusArgs) -> Result<()> {
    let groups = match &args.group {
        Some(group) => {
            let (namespace, name) = super::group_ref(&client, group, args.namespace.as_deref())?;
            let api: Api<ElectionGroup> = Api::namespaced(client, &namespace);
            match api.get(&name).await {
                Ok(group) => vec![group],
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    bail!("ElectionGroup {namespace}/{name} not found")
                }
                Err(e) => {
                    return Err(e).context(format!("reading ElectionGroup {namespace}/{name}"));
                }
            }
        }
        None => {
            let api: Api<ElectionGroup> = match &args.namespace {
                Some(namespace) => Api::namespaced(client, namespace),
                None => Api::all(client),
            };
            let mut groups = api
                .list(&ListParams::default())
                .await
                .context("listing ElectionGroups (is the CRD installed?)")?
                .items;
            groups.sort_by_key(|g| (g.namespace(), g.name_any()));
            groups
        }
    };
    if groups.is_empty() {
        println!("no ElectionGroups found");
    }
    let now = Timestamp::now();
    for group in &groups {
        print!("{}", render(group, now));
    }
    Ok(())
}

/// One group as `podium status` prints it.
pub fn render(group: &ElectionGroup, now: Timestamp) -> String {
    let mut out = String::new();
    let name = format!(
        "{}/{}",
        group.namespace().unwrap_or_default(),
        group.name_any()
    );
    let _ = writeln!(out, "{name}");
    let Some(status) = &group.status else {
        let _ = writeln!(out, "  no status yet: is the podium operator running?\n");
        return out;
    };
    let ago = |t: &Timestamp| {
        let secs = now.duration_since(*t).as_secs().max(0);
        format!("{t} ({} ago)", human(secs))
    };
    let leader = match &status.leader {
        Some(leader) => format!(
            "{leader} at epoch {}{}",
            status.epoch.unwrap_or_default(),
            status
                .leader_since
                .as_ref()
                .map(|t| format!(", since {}", ago(&t.0)))
                .unwrap_or_default()
        ),
        None => format!("none (epoch {})", status.epoch.unwrap_or_default()),
    };
    let _ = writeln!(out, "  leader:      {leader}");
    let _ = writeln!(
        out,
        "  eligible:    {} of {} members",
        status.eligible_members, status.members
    );
    if let Some(t) = &status.last_transition {
        let _ = writeln!(
            out,
            "  last change: {} -> {}, {} at epoch {}, {}{}",
            t.from.as_deref().unwrap_or("-"),
            t.to.as_deref().unwrap_or("-"),
            t.reason,
            t.epoch,
            ago(&t.at.0),
            t.duration_millis
                .map(|ms| format!(", took {ms} ms"))
                .unwrap_or_default()
        );
    }
    if let Some(s) = &status.last_switchover {
        let _ = writeln!(
            out,
            "  switchover:  {} {} ({} -> {}): {}",
            s.id,
            s.result,
            s.from.as_deref().unwrap_or("-"),
            s.to.as_deref().unwrap_or("-"),
            s.message
        );
    }
    let _ = writeln!(out, "  conditions:");
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "    {:<18} {:<5} {}: {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    out.push('\n');
    out
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ElectionGroupSpec, ElectionGroupStatus, LeaderTransition};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};

    #[test]
    fn a_group_prints_its_leader_last_change_and_conditions() {
        let at = |s: i64| Time(Timestamp::from_second(1_800_000_000 + s).unwrap());
        let mut group = ElectionGroup::new(
            "web",
            ElectionGroupSpec::selecting(LabelSelector::default()),
        );
        group.metadata.namespace = Some("shop".into());
        assert!(render(&group, at(0).0).contains("no status yet"));
        group.status = Some(ElectionGroupStatus {
            leader: Some("web-1".into()),
            epoch: Some(6),
            leader_since: Some(at(0)),
            members: 3,
            eligible_members: 2,
            last_transition: Some(LeaderTransition {
                from: Some("web-0".into()),
                to: Some("web-1".into()),
                reason: "PodDeleted".into(),
                epoch: 6,
                at: at(0),
                duration_millis: Some(38),
            }),
            conditions: vec![Condition {
                type_: "LeaderElected".into(),
                status: "True".into(),
                reason: "Elected".into(),
                message: "pod web-1 leads at epoch 6".into(),
                observed_generation: None,
                last_transition_time: at(0),
            }],
            ..Default::default()
        });
        let text = render(&group, at(90).0);
        for want in [
            "shop/web\n",
            "leader:      web-1 at epoch 6, since 2027-01-15T08:00:00Z (90s ago)",
            "eligible:    2 of 3 members",
            "last change: web-0 -> web-1, PodDeleted at epoch 6",
            "took 38 ms",
            "LeaderElected      True  Elected: pod web-1 leads at epoch 6",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
