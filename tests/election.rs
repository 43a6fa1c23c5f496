//! The election controller end to end on the real testbed: kube-apiserver, etcd and
//! kube-controller-manager, with a simulated kubelet and the operator in-process.

mod common;

use std::time::{Duration, Instant};

use common::checker::Checker;
use common::{fixture, pod_ip, wait_for};
use kube::ResourceExt;
use podium::crd::{EPOCH_ANNOTATION, ROLE_LABEL};
use podium::testbed::kubelet::endpointslice_addresses;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_elects_one_leader_and_the_service_routes_to_it() {
    let f = fixture("elect").await;
    f.deploy("web", 3).await;
    let service = f.leader_service("web").await;
    let checker = Checker::start(&f.client, &f.ns, "web", Some(&service)).await;
    let operator = f.operator().await;

    let created = Instant::now();
    f.group("web", "web", json!({})).await;
    let leader = f.wait_leader_other_than(None, Duration::from_secs(2)).await;
    println!(
        "first leader labelled {:?} after the group was created",
        created.elapsed()
    );
    let name = leader.name_any();
    assert_eq!(
        leader
            .annotations()
            .get(EPOCH_ANNOTATION)
            .map(String::as_str),
        Some("1")
    );

    let (holder, epoch) = f.lease_state("web").await;
    assert_eq!((holder.as_deref(), epoch), (Some(name.as_str()), 1));
    let lease = f.leases().get("web").await.unwrap();
    assert_eq!(lease.owner_references()[0].kind, "ElectionGroup");
    assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(4));

    let pods = f.pods();
    wait_for(Duration::from_secs(2), "two followers", || {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&kube::api::ListParams::default().labels(&format!("{ROLE_LABEL}=follower")))
                .await
                .ok()?;
            (l.items.len() == 2).then_some(())
        }
    })
    .await;

    let group = f
        .wait_status("web", Some(&name), Duration::from_secs(2))
        .await;
    let status = group.status.unwrap();
    assert_eq!(status.epoch, Some(1));
    assert_eq!(status.eligible.as_deref(), Some("3/3"));
    assert_eq!((status.members, status.eligible_members), (3, 3));
    assert_eq!(status.leader_uid.as_deref(), leader.metadata.uid.as_deref());
    assert_eq!(status.observed_generation, group.metadata.generation);
    let elected = status
        .conditions
        .iter()
        .find(|c| c.type_ == "LeaderElected")
        .unwrap();
    assert_eq!(elected.status, "True");

    let ip = pod_ip(&leader);
    let addresses = wait_for(
        Duration::from_secs(5),
        "the EndpointSlice to list the leader",
        || {
            let (client, ns, service, ip) =
                (f.client.clone(), f.ns.clone(), service.clone(), ip.clone());
            async move {
                let a = endpointslice_addresses(&client, &ns, &service).await.ok()?;
                (a == vec![ip]).then_some(a)
            }
        },
    )
    .await;
    assert_eq!(addresses.len(), 1);

    // Renewal at TTL/2 keeps the holder and the epoch.
    let before = f
        .leases()
        .get("web")
        .await
        .unwrap()
        .spec
        .unwrap()
        .renew_time
        .unwrap()
        .0;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let after = f.leases().get("web").await.unwrap().spec.unwrap();
    assert!(
        after.renew_time.unwrap().0 > before,
        "renewTime did not move within TTL/2"
    );
    assert_eq!(after.lease_transitions, Some(1));

    checker.assert_invariants(&f.client, &f.ns).await;
    operator.stop().await;
}
