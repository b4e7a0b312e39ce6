//! The ledger partitions are shared among the live nodes by the owners'
//! consumer group on a real broker, and `partition_owners` in a real Postgres
//! says who owns what: one node owns all, a second takes half, and when the
//! first leaves the second owns all again.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use troop_coordinator::cluster::ownership::{Ownership, owners};

const PARTITIONS: u32 = 4;

/// Waits (bounded) until `ready` holds; group joins and rebalances take
/// seconds.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all() -> BTreeSet<i32> {
    (0..i32::try_from(PARTITIONS).expect("small")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_nodes_share_the_ledger_partitions() {
    let (_db, _broker, config, client) = common::cluster::cluster("own", PARTITIONS).await;
    let table = || async { owners(&client).await.expect("owners") };
    let by = |node: &str, parts: &BTreeSet<i32>| -> BTreeMap<i32, String> {
        parts.iter().map(|p| (*p, node.to_owned())).collect()
    };

    let a = Ownership::start(&config, "node-a").expect("joins");
    until("node-a owns every partition", || async {
        a.owned() == all() && table().await == by("node-a", &all())
    })
    .await;

    let b = Ownership::start(&config, "node-b").expect("joins");
    until("the two nodes share them", || async {
        let (oa, ob) = (a.owned(), b.owned());
        oa.len() == 2 && ob.len() == 2 && oa.union(&ob).copied().collect::<BTreeSet<_>>() == all()
    })
    .await;
    let (oa, ob) = (a.owned(), b.owned());
    assert!(
        oa.is_disjoint(&ob),
        "no partition has two owners: {oa:?} {ob:?}"
    );
    let mut expected = by("node-a", &oa);
    expected.extend(by("node-b", &ob));
    until("partition_owners says so", || async {
        table().await == expected
    })
    .await;

    // node-a leaves: node-b owns everything, and the table forgets node-a.
    a.stop().await.expect("stops");
    until("node-b owns every partition", || async {
        b.owned() == all() && table().await == by("node-b", &all())
    })
    .await;
    b.stop().await.expect("stops");
    assert!(table().await.is_empty(), "a node that left owns nothing");
}
