//! Partition owners judge their accounts' money on a real broker and a real
//! Postgres, with the sequencer running: a new owner fences the old one and
//! takes over its unsequenced tail, so an account cannot be overdrawn across
//! the hand-over; credits and accounts from other partitions count once
//! sequenced; and the sequencer accepts everything the owners accepted.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cluster::{Job, Traffic, account_row, micro};
use troop_coordinator::cluster::idle::IdlePause;
use troop_coordinator::cluster::internal::{ClusterBooks, Internal, Secret, Verdict};
use troop_coordinator::cluster::ledger_node::{self, LedgerNode};
use troop_coordinator::cluster::owned::{OwnedBooks, OwnedSettings};
use troop_coordinator::cluster::owner::{OwnerError, PartitionBooks, home_partition};
use troop_coordinator::cluster::ownership::Ownership;
use troop_coordinator::cluster::projection::{partition_of, partition_of_key};
use troop_coordinator::cluster::reads::PgReads;
use troop_coordinator::cluster::sequencer::{SequencerProgress, SequencerSettings, SequencerTask};
use troop_coordinator::money::Refusal;
use troop_coordinator::money::conformance::{Fixture, run_all};
use troop_coordinator::reads;
use troop_ledger::fold::{FoldError, Ledger};
use troop_schemas::event::AccountRole;
use troop_schemas::{AccountId, Event, HoldId, JobId};

const PARTITIONS: u32 = 2;
const AT_MS: u64 = 1_790_000_000_000;

fn signer() -> troop_ledger::note::NoteSigner {
    troop_ledger::note::NoteSigner::new(
        "cluster.example/ledger",
        ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
    )
    .expect("signer")
}

/// The sequencer task, as every node runs it, quick to take the lead.
fn start_sequencer(config: &troop_coordinator::config::ClusterConfig) -> SequencerTask {
    let mut settings = SequencerSettings::new(config.clone());
    settings.standby_retry = Duration::from_millis(100);
    SequencerTask::spawn(settings, signer())
}

/// Submits `events` to `owner` and waits until the accepted ones are durable.
async fn put(owner: &mut PartitionBooks, events: &[Event]) -> Vec<Result<u64, OwnerError>> {
    let (verdicts, pending) = owner.submit(events).expect("the log takes them");
    if let Some(pending) = pending {
        pending.durable().await.expect("durable");
    }
    verdicts
}

/// Waits (bounded) until the sequencer has `entries` in the ledger.
async fn sequenced(progress: &SequencerProgress, entries: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while progress.tree_size.load(Ordering::SeqCst) != entries {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {entries} entries (have {})",
            progress.tree_size.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn account_in(partition: u32) -> AccountId {
    (0u32..)
        .map(|n| AccountId::derive(format!("other-{n}").as_bytes()))
        .find(|a| partition_of(a, PARTITIONS) == partition)
        .expect("some account lands there")
}

/// Node A takes both partitions and writes the network's `setup`, each event
/// to the partition that judges it, following the ledger in between (the
/// worker's registration needs its account, which may live elsewhere).
async fn owners_set_up(
    client: &tokio_postgres::Client,
    config: &troop_coordinator::config::ClusterConfig,
    progress: &SequencerProgress,
    setup: &[Event],
) -> [PartitionBooks; PARTITIONS as usize] {
    let mut owners = [
        PartitionBooks::take(client, config, 0)
            .await
            .expect("takes 0"),
        PartitionBooks::take(client, config, 1)
            .await
            .expect("takes 1"),
    ];
    let first = progress.tree_size.load(Ordering::SeqCst);
    for (n, event) in (1..).zip(setup) {
        let home = home_partition(event, owners[0].ledger(), PARTITIONS)
            .expect("judgeable")
            .expect("placed");
        let owner = &mut owners[usize::try_from(home).expect("small")];
        put(owner, std::slice::from_ref(event)).await[0]
            .as_ref()
            .expect("accepted");
        sequenced(progress, first + n).await;
        for owner in &mut owners {
            owner.follow(client).await.expect("follows");
        }
    }
    owners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_fences_the_old_one_and_no_account_is_overdrawn_across_the_hand_over() {
    let (_db, _broker, config, client) = common::cluster::cluster("owner", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);

    let traffic = Traffic::new(1, 2, AT_MS);
    let mut a = owners_set_up(&client, &config, &progress, &traffic.setup).await;
    let mut entries = traffic.setup.len() as u64;

    // A consumer in partition p: opened, funded, one hold placed by node A.
    let (consumer, events) = &traffic.consumers[0];
    let p = partition_of(consumer, PARTITIONS);
    let q = 1 - p;
    let (pi, qi) = (
        usize::try_from(p).expect("small"),
        usize::try_from(q).expect("small"),
    );
    // opened, granted 1,000,000, hold j0 (50,000), its settlement, hold j1 (50,000)
    assert_eq!(events.len(), 5);
    for verdict in put(&mut a[pi], &events[..3]).await {
        verdict.expect("accepted");
    }
    entries += 3;

    // Node B takes p over: A is fenced, and B's fold has A's unsequenced
    // hold, read from the partition's tail.
    let mut b = PartitionBooks::take(&client, &config, i32::try_from(p).expect("small"))
        .await
        .expect("B takes p");
    let available = |owner: &PartitionBooks| {
        owner
            .ledger()
            .account(consumer)
            .expect("the consumer's account")
            .available()
    };
    assert_eq!(available(&b), 950_000, "the hold A placed is in B's fold");
    let hold = |name: &[u8], amount| Event::HoldPlaced {
        hold: HoldId::derive(name),
        job: JobId::derive(name),
        account: *consumer,
        model: "m".into(),
        amount_micro: micro(amount),
        expires_at_ms: AT_MS + 600_000,
        schedule_version: 1,
        at_ms: AT_MS,
        origin: None,
    };
    let from_a = hold(b"from-a", 900_000);
    // A still believes it owns p and accepts the hold, but the broker no
    // longer takes its writes: nothing of it is ever acknowledged.
    let fenced = match a[pi].submit(std::slice::from_ref(&from_a)) {
        Ok((_, Some(pending))) => pending.durable().await.is_err(),
        Ok((_, None)) => panic!("A's fold refused a hold it can afford"),
        Err(_) => true,
    };
    assert!(fenced, "the old owner's write fails");
    assert!(
        matches!(
            a[pi].submit(&[hold(b"from-a-2", 10)]),
            Err(OwnerError::EventLog(_))
        ),
        "and it writes nothing more"
    );

    // B judges from the true balance: the same hold does not fit next to
    // what is already held, a smaller one does.
    let too_much = hold(b"too-much", 960_000);
    let verdicts = put(&mut b, &[too_much, events[3].clone(), events[4].clone()]).await;
    assert!(
        matches!(
            verdicts[0],
            Err(OwnerError::Refused(FoldError::InsufficientFunds { .. }))
        ),
        "{:?}",
        verdicts[0]
    );
    verdicts[1].as_ref().expect("B settles A's hold");
    verdicts[2].as_ref().expect("B places the next hold");
    entries += 2;

    // An account opened in the other partition (still A's) counts in B's
    // judgement only once sequenced.
    let other = account_in(q);
    for verdict in put(
        &mut a[qi],
        &[Event::AccountOpened {
            account: other,
            role: AccountRole::Consumer,
            at_ms: AT_MS,
        }],
    )
    .await
    {
        verdict.expect("accepted");
    }
    entries += 1;
    let transfer = Event::Transfer {
        from: *consumer,
        to: other,
        amount_micro: micro(1_000),
        memo: "thanks".into(),
        at_ms: AT_MS + 5,
    };
    // Not yet followed: B does not know the account.
    let early = put(&mut b, std::slice::from_ref(&transfer)).await;
    assert!(
        matches!(
            early[0],
            Err(OwnerError::Refused(FoldError::UnknownAccount(_)))
        ),
        "{:?}",
        early[0]
    );
    sequenced(&progress, entries).await;
    assert!(b.follow(&client).await.expect("follows") > 0);
    put(&mut b, std::slice::from_ref(&transfer)).await[0]
        .as_ref()
        .expect("the transfer, once the account is sequenced");
    entries += 1;

    // The sequencer accepted everything the owners accepted (it stops on a
    // refusal), and nothing of A's after the hand-over.
    sequenced(&progress, entries).await;
    assert!(progress.leading.load(Ordering::SeqCst));
    let fenced_hold: i64 = client
        .query_one(
            "select count(*) from holds where hold = $1",
            &[&HoldId::derive(b"from-a").to_string()],
        )
        .await
        .expect("holds")
        .get(0);
    assert_eq!(
        fenced_hold, 0,
        "the fenced owner's hold is not in the ledger"
    );
    // Postgres's balance of the consumer is B's.
    let account = b.ledger().account(consumer).expect("in B's fold").clone();
    assert_eq!(
        account_row(&client, consumer).await,
        (
            account.credits_posted.to_string(),
            account.debits_posted.to_string(),
            account.debits_pending.to_string()
        )
    );
    assert_eq!(account.debits_pending, 50_000, "hold j1 is open");

    // A broker that lost acknowledged records (noida-db killed before it
    // saved them): the partition's log ends before what was sequenced from
    // it, and nobody judges on it, since new records would take old numbers.
    let lost_dir = tempfile::tempdir().expect("dir");
    let empty = troop_coordinator::eventlog::file::FileLog::open(
        lost_dir.path(),
        troop_coordinator::eventlog::file::FileLogConfig::default(),
    )
    .expect("an empty log");
    let lost = PartitionBooks::load(
        &client,
        std::sync::Arc::new(empty),
        &config.topic("ledger"),
        i32::try_from(p).expect("small"),
        PARTITIONS,
    )
    .await;
    assert!(
        matches!(lost, Err(OwnerError::LogLost { log_end: 0, applied, .. }) if applied > 0),
        "{lost:?}"
    );
    sequencer.stop().await.expect("stops");
}

/// Waits (bounded) until `ready` holds; group joins and rebalances take seconds.
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits `events` to `partition` on `node` and waits for durability.
async fn put_on(
    node: &OwnedBooks,
    partition: u32,
    events: &[Event],
) -> Vec<Result<u64, OwnerError>> {
    let (verdicts, pending) = node
        .submit(i32::try_from(partition).expect("small"), events)
        .await
        .expect("owned here");
    if let Some(pending) = pending {
        pending.durable().await.expect("durable");
    }
    verdicts
}

const SECRET: &str = "a cluster secret for tests";

/// A node with everything that judges money: membership, owned partitions,
/// the internal API on a free port (advertised in `nodes`), and its door to
/// every partition.
struct MoneyNode {
    membership: Ownership,
    books: ClusterBooks,
    server: actix_web::dev::ServerHandle,
    url: String,
}

impl MoneyNode {
    async fn start(config: &troop_coordinator::config::ClusterConfig, name: &str) -> Self {
        // The tests' events carry a fixed 2026 clock: the wall clock would
        // expire their holds at once.
        Self::start_with(config, name, None).await
    }

    /// Expiring overdue holds every `expire_every`.
    async fn start_with(
        config: &troop_coordinator::config::ClusterConfig,
        name: &str,
        expire_every: Option<Duration>,
    ) -> Self {
        let settings = OwnedSettings {
            // Doubling while idle, as in production, on a shorter scale.
            follow: IdlePause {
                first: Duration::from_millis(50),
                max: Duration::from_millis(400),
            },
            retake_after: Duration::from_millis(200),
            expire_every,
            dead_after: Duration::from_secs(1),
        };
        Self::start_settled(config, name, settings).await
    }

    async fn start_settled(
        config: &troop_coordinator::config::ClusterConfig,
        name: &str,
        settings: OwnedSettings,
    ) -> Self {
        let membership = Ownership::start(config, name).expect("joins");
        let owned = std::sync::Arc::new(OwnedBooks::start(
            config.clone(),
            membership.watch(),
            settings,
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = ledger_node::serve(
            LedgerNode::new(config.clone(), std::sync::Arc::default()),
            Some(Internal {
                owned: std::sync::Arc::clone(&owned),
                secret: Secret::new(SECRET).expect("long enough"),
                relay: None,
            }),
            listener,
        )
        .expect("serves");
        let handle = server.handle();
        tokio::spawn(server);
        let postgres = troop_coordinator::cluster::connect(&config.postgres, "test node")
            .await
            .expect("postgres");
        troop_coordinator::cluster::presence::advertise(&postgres, name, &url, name)
            .await
            .expect("advertises");
        Self {
            membership,
            books: ClusterBooks::new(owned, SECRET, postgres, PARTITIONS),
            server: handle,
            url,
        }
    }

    async fn change(&self, partition: u32, events: &[Event]) -> Vec<Verdict> {
        self.books
            .change_in(i32::try_from(partition).expect("small"), events)
            .await
            .expect("judged")
    }

    async fn stop(self) {
        self.server.stop(true).await;
        self.membership.stop().await.expect("leaves");
        match std::sync::Arc::try_unwrap(self.books.owned) {
            Ok(owned) => owned.stop().await,
            Err(_) => panic!("the server still holds the owned books"),
        }
    }
}

/// Nodes A and B, once they own one partition each.
async fn two_nodes(config: &troop_coordinator::config::ClusterConfig) -> (MoneyNode, MoneyNode) {
    let (a, b) = (
        MoneyNode::start(config, "node-a").await,
        MoneyNode::start(config, "node-b").await,
    );
    until("the two nodes share the partitions", || async {
        a.books.owned.loaded().len() == 1 && b.books.owned.loaded().len() == 1
    })
    .await;
    (a, b)
}

/// A hold of 50,000 on `consumer`, named by `name`, open for ten minutes.
fn hold_of(consumer: &AccountId, name: &str) -> Event {
    Event::HoldPlaced {
        hold: HoldId::derive(name.as_bytes()),
        job: JobId::derive(name.as_bytes()),
        account: *consumer,
        model: "m".into(),
        amount_micro: micro(50_000),
        expires_at_ms: AT_MS + 600_000,
        schedule_version: 1,
        at_ms: AT_MS,
        origin: None,
    }
}

/// The network's setup sent through `via` (owner or not), each event to
/// the partition that judges it, sequenced and folded by every owner among
/// `nodes` before the next (a registration needs its account, which may live
/// in another partition). Returns the entries written.
async fn set_up(
    nodes: &[&MoneyNode],
    via: &MoneyNode,
    setup: &[Event],
    progress: &SequencerProgress,
) -> u64 {
    let mut entries = 0u64;
    for event in setup {
        let home = home_partition(event, &Ledger::new(), PARTITIONS)
            .expect("judgeable")
            .expect("placed");
        assert!(matches!(
            via.change(home, std::slice::from_ref(event)).await[..],
            [Verdict::Record(_)]
        ));
        entries += 1;
        sequenced(progress, entries).await;
        until("every owner followed", || async {
            for node in nodes {
                for p in node.books.owned.loaded() {
                    if node.books.owned.with_ledger(p, Ledger::applied).await != Some(entries) {
                        return false;
                    }
                }
            }
            true
        })
        .await;
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_partitions_follow_the_group_and_an_account_keeps_its_money_across_nodes() {
    let (_db, _broker, config, client) = common::cluster::cluster("owned", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);
    let all: std::collections::BTreeSet<i32> = (0..2).collect();
    let a = MoneyNode::start(&config, "node-a").await;
    until("node-a holds both partitions", || async {
        a.books.owned.loaded() == all
    })
    .await;
    let traffic = Traffic::new(1, 2, AT_MS);
    let mut entries = set_up(&[&a], &a, &traffic.setup, &progress).await;
    let (consumer, events) = &traffic.consumers[0];
    let p = partition_of(consumer, PARTITIONS);
    let pi = i32::try_from(p).expect("small");
    for verdict in put_on(&a.books.owned, p, &events[..3]).await {
        verdict.expect("accepted");
    }
    entries += 3;

    // node-b joins: the partitions are shared, each loaded by one node.
    let b = MoneyNode::start(&config, "node-b").await;
    until("the two nodes share the partitions", || async {
        let (la, lb) = (a.books.owned.loaded(), b.books.owned.loaded());
        la.len() == 1
            && lb.len() == 1
            && la
                .union(&lb)
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                == all
    })
    .await;
    let (owner, other) = if a.books.owned.loaded().contains(&pi) {
        (&a.books.owned, &b.books.owned)
    } else {
        (&b.books.owned, &a.books.owned)
    };
    assert!(matches!(
        other.submit(pi, &events[3..4]).await,
        Err(OwnerError::NotOwned(n)) if n == pi
    ));
    let available = |l: &Ledger| l.account(consumer).expect("the consumer").available();
    assert_eq!(owner.with_ledger(pi, available).await, Some(950_000));
    for verdict in put_on(owner, p, &events[3..]).await {
        verdict.expect("settled and held again");
    }
    entries += 2;

    // node-a leaves: node-b takes everything, with the consumer's money as it was.
    let expected = owner.with_ledger(pi, available).await.expect("held");
    a.stop().await;
    until("node-b holds both partitions", || async {
        b.books.owned.loaded() == all
    })
    .await;
    assert_eq!(
        b.books.owned.with_ledger(pi, available).await,
        Some(expected)
    );
    let too_much = Event::HoldPlaced {
        hold: HoldId::derive(b"too-much"),
        job: JobId::derive(b"too-much"),
        account: *consumer,
        model: "m".into(),
        amount_micro: micro(u64::try_from(expected).expect("positive") + 1),
        expires_at_ms: AT_MS + 600_000,
        schedule_version: 1,
        at_ms: AT_MS,
        origin: None,
    };
    assert!(matches!(
        put_on(&b.books.owned, p, &[too_much]).await[0],
        Err(OwnerError::Refused(FoldError::InsufficientFunds { .. }))
    ));

    // Everything accepted is sequenced (the sequencer stops on a refusal).
    sequenced(&progress, entries).await;
    assert_eq!(
        account_row(&client, consumer).await.2,
        "50000",
        "hold j1 is open"
    );
    b.stop().await;
    sequencer.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_account_hammered_through_three_nodes_is_never_overdrawn() {
    let (_db, _broker, config, client) = common::cluster::cluster("internal", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b", "node-c"] {
        nodes.push(MoneyNode::start(&config, name).await);
    }
    until("the nodes share both partitions", || async {
        let loaded: Vec<_> = nodes.iter().map(|n| n.books.owned.loaded()).collect();
        let total: usize = loaded.iter().map(std::collections::BTreeSet::len).sum();
        let union: std::collections::BTreeSet<i32> = loaded.iter().flatten().copied().collect();
        total == 2 && union.len() == 2
    })
    .await;

    // The setup sent through node-c, owner or not.
    let traffic = Traffic::new(1, 1, AT_MS);
    let all_nodes: Vec<&MoneyNode> = nodes.iter().collect();
    let mut entries = set_up(&all_nodes, &nodes[2], &traffic.setup, &progress).await;
    let (consumer, events) = &traffic.consumers[0];
    let p = partition_of(consumer, PARTITIONS);
    for verdict in nodes[1].change(p, &events[..2]).await {
        assert!(matches!(verdict, Verdict::Record(_)), "{verdict:?}");
    }
    entries += 2;

    // 30 holds of 50,000 against 1,000,000, ten through each node at once:
    // exactly 20 fit, whichever node each arrives on.
    let hold = |n: u32| hold_of(consumer, &format!("hammer-{n}"));
    let requests = (0..30u32).map(|n| {
        let node = &nodes[usize::try_from(n % 3).expect("small")];
        async move { node.change(p, &[hold(n)]).await }
    });
    let verdicts: Vec<Verdict> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .flatten()
        .collect();
    let accepted = verdicts
        .iter()
        .filter(|v| matches!(v, Verdict::Record(_)))
        .count();
    let short = verdicts
        .iter()
        .filter(|v| matches!(v, Verdict::Refused(r) if r.code == Refusal::INSUFFICIENT_FUNDS))
        .count();
    assert_eq!((accepted, short), (20, 10), "{verdicts:?}");
    entries += 20;

    // The internal API takes no call without the cluster's secret.
    for bearer in [None, Some("Bearer not the cluster secret")] {
        let url = format!("{}/internal/v1/ledger/{p}/changes", nodes[0].url);
        let status = tokio::task::spawn_blocking(move || {
            let request = ureq::post(&url);
            let request = match bearer {
                Some(b) => request.set("authorization", b),
                None => request,
            };
            match request.send_string(r#"{"events":[]}"#) {
                Err(ureq::Error::Status(code, _)) => code,
                other => panic!("expected a refusal, got {other:?}"),
            }
        })
        .await
        .expect("calls");
        assert_eq!(status, 401);
    }

    // The ledger agrees: every hold that fit, and the account fully held.
    sequenced(&progress, entries).await;
    assert_eq!(account_row(&client, consumer).await.2, "1000000");
    for node in nodes {
        node.stop().await;
    }
    sequencer.stop().await.expect("stops");
}

/// The owner answers a change as soon as it has judged, and its write
/// becomes durable afterwards: on the owning node and through another one, a
/// hold's verdict comes back while the broker is frozen, its write completes
/// once the broker runs again, and the sequencer takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_comes_before_its_write_is_durable_on_either_node() {
    let (_db, broker, config, client) = common::cluster::cluster("early", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);
    let (a, b) = two_nodes(&config).await;
    let traffic = Traffic::new(1, 1, AT_MS);
    let mut entries = set_up(&[&a, &b], &a, &traffic.setup, &progress).await;
    let (consumer, events) = &traffic.consumers[0];
    let p = partition_of(consumer, PARTITIONS);
    let pi = i32::try_from(p).expect("small");
    for verdict in a.change(p, &events[..2]).await {
        assert!(matches!(verdict, Verdict::Record(_)), "{verdict:?}");
    }
    entries += 2;
    let (owner, other) = if a.books.owned.loaded().contains(&pi) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let hold = |n: u32| hold_of(consumer, &format!("early-{n}"));

    broker.pause();
    let mut writes = Vec::new();
    for (n, node) in [(1, owner), (2, other)] {
        // Bounded so that a verdict waiting for the broker fails the test
        // instead of hanging it.
        let (verdicts, write) =
            tokio::time::timeout(Duration::from_secs(20), node.books.judge_in(pi, &[hold(n)]))
                .await
                .expect("the verdict does not wait for the frozen broker")
                .expect("judged");
        assert!(matches!(verdicts[..], [Verdict::Record(_)]), "{verdicts:?}");
        writes.push(tokio::spawn(write.expect("a write to wait for").durable()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        writes.iter().all(|w| !w.is_finished()),
        "nothing is durable while the broker is frozen"
    );
    broker.resume();
    for write in writes {
        write.await.expect("joins").expect("durable");
    }
    entries += 2;
    sequenced(&progress, entries).await;
    assert_eq!(account_row(&client, consumer).await.2, "100000");
    a.stop().await;
    b.stop().await;
    sequencer.stop().await.expect("stops");
}

/// A schedule and a coordinator key published by the treasury's partition and
/// sequenced between an owner's judgement and its events: the owner has not
/// folded them, prices at the old schedule and countersigns with the retired
/// key, and the sequencer still accepts every event (it stops on a refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_and_key_sequenced_behind_an_owners_back_do_not_stop_the_sequencer() {
    let (_db, _broker, config, client) = common::cluster::cluster("race", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);
    let traffic = Traffic::new(0, 0, AT_MS);
    let mut owners = owners_set_up(&client, &config, &progress, &traffic.setup).await;
    let mut entries = traffic.setup.len() as u64;

    // The consumer lives in the partition that does not publish schedules.
    let t = partition_of(&AccountId::TREASURY, PARTITIONS);
    let p = 1 - t;
    let (ti, pi) = (
        usize::try_from(t).expect("small"),
        usize::try_from(p).expect("small"),
    );
    let consumer = account_in(p);
    let job = |name: &[u8]| Job {
        hold: HoldId::derive(name),
        job: JobId::derive(name),
        consumer,
        reserved: micro(100_000),
    };
    let place = |job: &Job, version: u64| Event::HoldPlaced {
        hold: job.hold,
        job: job.job,
        account: consumer,
        model: "m".into(),
        amount_micro: job.reserved,
        expires_at_ms: AT_MS + 600_000,
        schedule_version: version,
        at_ms: AT_MS,
        origin: None,
    };
    let (first, second) = (job(b"first"), job(b"second"));
    let old = owners[pi].ledger().schedule().expect("published").clone();
    for verdict in put(
        &mut owners[pi],
        &[
            Event::AccountOpened {
                account: consumer,
                role: AccountRole::Consumer,
                at_ms: AT_MS,
            },
            Event::Grant {
                account: consumer,
                amount_micro: micro(1_000_000),
                memo: String::new(),
                at_ms: AT_MS,
            },
            place(&first, old.version),
        ],
    )
    .await
    {
        verdict.expect("accepted");
    }
    entries += 3;

    // The treasury's partition raises the prices tenfold and rotates the
    // coordinator key; both are sequenced, and p's owner does not follow.
    let newer = ed25519_dalek::SigningKey::from_bytes(&[33; 32]);
    let raise = Event::PriceSchedulePublished {
        version: old.version + 1,
        fee_bps: 1_000,
        prices: vec![troop_schemas::event::ModelPrice {
            model: "m".into(),
            input_micro_per_1k: micro(10_000),
            output_micro_per_1k: micro(30_000),
        }],
        at_ms: AT_MS + 1,
    };
    let rotate = Event::KeyRotated {
        role: troop_schemas::event::KeyRole::Coordinator,
        name: "coordinator-2".into(),
        key: troop_ledger::receipt::public_key(&newer),
        at_ms: AT_MS + 1,
    };
    let published = put(&mut owners[ti], &[raise, rotate]).await;
    let rotated_at = *published[1].as_ref().expect("accepted");
    published[0].as_ref().expect("accepted");
    entries += 2;
    sequenced(&progress, entries).await;
    assert_eq!(
        owners[pi].ledger().schedule().map(|s| s.version),
        Some(old.version),
        "p's owner has not folded the new schedule"
    );

    // p's owner settles at its view: the old schedule, the retired key; and
    // places another hold at the old schedule.
    let settled = Traffic::settlement(&first, (100, 20), &old, &Traffic::coordinator(), AT_MS + 2);
    let Event::HoldSettled { charged_micro, .. } = &settled else {
        unreachable!()
    };
    // 100 in × 1,000/1k + 20 out × 3,000/1k at the old schedule.
    assert_eq!(charged_micro.get(), 160);
    let judged = put(&mut owners[pi], &[settled, place(&second, old.version)]).await;
    let settled_at = *judged[0].as_ref().expect("accepted");
    judged[1].as_ref().expect("accepted");
    entries += 2;

    // The sequencer took all of it, in an order where the new schedule and
    // key came first, and Postgres holds the owner's balance.
    sequenced(&progress, entries).await;
    assert!(progress.leading.load(Ordering::SeqCst));
    let leaves = common::cluster::leaves(&client).await;
    let position = |partition: u32, record: u64| {
        leaves
            .iter()
            .position(|l| *l == (i32::try_from(partition).expect("small"), record))
            .expect("sequenced")
    };
    assert!(
        position(t, rotated_at) < position(p, settled_at),
        "the rotation was sequenced before the settlement"
    );
    let (_, debits, pending) = account_row(&client, &consumer).await;
    let account = owners[pi]
        .ledger()
        .account(&consumer)
        .expect("folded")
        .clone();
    assert_eq!(
        (debits, pending),
        (
            account.debits_posted.to_string(),
            account.debits_pending.to_string()
        )
    );
    assert_eq!(
        (account.debits_posted, account.debits_pending),
        (160, 100_000)
    );
    owners[pi].follow(&client).await.expect("follows");
    assert_eq!(
        owners[pi].ledger().schedule().map(|s| s.version),
        Some(old.version + 1)
    );
    sequencer.stop().await.expect("stops");
}

/// The cluster's `Money` and `Reads` adapters pass the suites the embedded
/// books pass (`embedded_ports.rs`): changes asked of one node, with accounts
/// of the partition that node owns (judged in-process) and of the other
/// node's (over the internal API); reads from Postgres as the sequencer
/// projects and publishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_books_pass_the_money_and_reads_suites() {
    let (_db, _broker, config, _client) = common::cluster::cluster("money", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);
    let (a, b) = two_nodes(&config).await;
    // The network's prices, sequenced and followed by both owners.
    let traffic = Traffic::new(0, 0, AT_MS);
    set_up(&[&a, &b], &a, &traffic.setup, &progress).await;
    let fixture = Fixture {
        money: &b.books,
        model: "m",
        schedule_version: 1,
        at_ms: AT_MS,
    };
    let mut fold = Ledger::new();
    for event in &traffic.setup {
        fold.apply(event).expect("the setup folds");
    }
    let schedule = fold.schedule().expect("published").clone();
    let reads = PgReads::new(&config.postgres, signer().verifier());
    let reads_fixture = reads::conformance::Fixture {
        books: fixture,
        reads: &reads,
        schedule: &schedule,
        coordinator: &Traffic::coordinator(),
        verifier: &signer().verifier(),
    };
    let here = *b.books.owned.loaded().first().expect("one");
    for partition in [here, 1 - here] {
        let partition = u32::try_from(partition).expect("small");
        let account = |test: &str| {
            (0u32..)
                .map(|n| AccountId::derive(format!("money-{test}-{n}").as_bytes()))
                .find(|a| partition_of(a, PARTITIONS) == partition)
                .expect("some account lands there")
        };
        run_all(fixture, &account).await;
        reads::conformance::run_all(reads_fixture, &account).await;
    }
    a.stop().await;
    b.stop().await;
    sequencer.stop().await.expect("stops");
}

/// Each owner expires the overdue holds of its own accounts by the wall
/// clock: with two nodes, each following the other's partition (so each
/// fold holds both holds), every hold gets exactly one expiry in the ledger,
/// the sequencer accepts them and the credits are released. Each owner also
/// voids its accounts' holds whose origin (a node incarnation) stopped
/// advertising itself, and only those: a live node's holds stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_expire_their_own_accounts_overdue_holds_once() {
    let (_db, _broker, config, client) = common::cluster::cluster("expire", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let progress = std::sync::Arc::clone(&sequencer.progress);
    let every = Some(Duration::from_millis(100));
    let (a, b) = (
        MoneyNode::start_with(&config, "node-a", every).await,
        MoneyNode::start_with(&config, "node-b", every).await,
    );
    until("the two nodes share the partitions", || async {
        a.books.owned.loaded().len() == 1 && b.books.owned.loaded().len() == 1
    })
    .await;
    let traffic = Traffic::new(0, 0, AT_MS);
    set_up(&[&a, &b], &a, &traffic.setup, &progress).await;
    // "node-a/live" keeps advertising itself; "ghost/1" never did.
    let advertising = {
        let postgres = troop_coordinator::cluster::connect(&config.postgres, "advertising")
            .await
            .expect("postgres");
        tokio::spawn(async move {
            loop {
                troop_coordinator::cluster::presence::advertise(
                    &postgres,
                    "node-a",
                    "http://unused",
                    "node-a/live",
                )
                .await
                .expect("advertises");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let now_ms = troop_coordinator::server::now_ms();
    let mut accounts = Vec::new();
    for partition in 0..PARTITIONS {
        let account = (0u32..)
            .map(|n| AccountId::derive(format!("expire-{n}").as_bytes()))
            .find(|a| partition_of(a, PARTITIONS) == partition)
            .expect("some account lands there");
        let id = format!("expire-{account}");
        let events = [
            Event::AccountOpened {
                account,
                role: AccountRole::Consumer,
                at_ms: now_ms,
            },
            Event::Grant {
                account,
                amount_micro: micro(1_000),
                memo: "expire".into(),
                at_ms: now_ms,
            },
            Event::HoldPlaced {
                hold: HoldId::derive(id.as_bytes()),
                job: JobId::derive(id.as_bytes()),
                account,
                model: "m".into(),
                amount_micro: micro(600),
                expires_at_ms: now_ms + 300,
                schedule_version: 1,
                at_ms: now_ms,
                origin: None,
            },
            Event::HoldPlaced {
                hold: HoldId::derive(format!("{id}-ghost").as_bytes()),
                job: JobId::derive(format!("{id}-ghost").as_bytes()),
                account,
                model: "m".into(),
                amount_micro: micro(300),
                expires_at_ms: now_ms + 3_600_000,
                schedule_version: 1,
                at_ms: now_ms,
                origin: Some("ghost/1".into()),
            },
            Event::HoldPlaced {
                hold: HoldId::derive(format!("{id}-live").as_bytes()),
                job: JobId::derive(format!("{id}-live").as_bytes()),
                account,
                model: "m".into(),
                amount_micro: micro(100),
                expires_at_ms: now_ms + 3_600_000,
                schedule_version: 1,
                at_ms: now_ms,
                origin: Some("node-a/live".into()),
            },
        ];
        // Asked of node a: one account judged here, one over the internal API.
        for verdict in a.change(partition, &events).await {
            assert!(matches!(verdict, Verdict::Record(_)), "{verdict:?}");
        }
        accounts.push(account);
    }
    until(
        "the due and the ghost's holds closed, sequenced and released",
        || async {
            let ids: Vec<String> = accounts.iter().map(ToString::to_string).collect();
            let released: i64 = client
                .query_one(
                    "select count(*) from accounts where account = any($1)
                 and credits_posted = 1000 and debits_posted = 0 and debits_pending = 100",
                    &[&ids],
                )
                .await
                .expect("accounts")
                .get(0);
            released == 2
        },
    )
    .await;
    // More rounds pass; nobody expires a hold twice, nor another's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = common::cluster::ledger_events(&client).await;
    let expiries = events
        .iter()
        .filter(|e| matches!(e, Event::HoldExpired { .. }))
        .count();
    assert_eq!(expiries, accounts.len());
    assert_eq!(
        common::cluster::dead_node_voids(&events),
        accounts.len(),
        "one void per ghost's hold"
    );
    let open: Vec<String> = client
        .query("select origin_node from holds order by hold", &[])
        .await
        .expect("holds")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        open,
        ["node-a/live", "node-a/live"],
        "the live node's holds stay"
    );
    advertising.abort();
    a.stop().await;
    b.stop().await;
    sequencer.stop().await.expect("stops");
}

/// A worker's registration is judged in the worker's partition, which knows
/// the worker's account only once it has followed the sequenced ledger. With
/// a follow pause longer than the test, the registration still goes
/// through: its refusal ("unknown account") wakes the owner's follow at
/// once. Without that, it would be refused until `REGISTRATION_WAIT` ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_refused_for_what_is_not_followed_yet_wakes_the_follow() {
    let (_db, _broker, config, _client) = common::cluster::cluster("nudge", PARTITIONS).await;
    let sequencer = start_sequencer(&config);
    let never = Duration::from_secs(3_600);
    let a = MoneyNode::start_settled(
        &config,
        "node-a",
        OwnedSettings {
            follow: IdlePause {
                first: never,
                max: never,
            },
            retake_after: Duration::from_millis(200),
            expire_every: None,
            dead_after: Duration::from_secs(1),
        },
    )
    .await;
    let all: std::collections::BTreeSet<i32> = (0..2).collect();
    until("node-a holds both partitions", || async {
        a.books.owned.loaded() == all
    })
    .await;
    // A worker whose account and registration land in different partitions.
    let key = (0u8..)
        .map(|n| {
            troop_schemas::PublicKey(
                ed25519_dalek::SigningKey::from_bytes(&[n; 32])
                    .verifying_key()
                    .to_bytes(),
            )
        })
        .find(|key| {
            let worker = troop_schemas::WorkerId::from_key(key);
            partition_of(&AccountId::derive(&key.0), PARTITIONS)
                != partition_of_key(&worker.to_string(), PARTITIONS)
        })
        .expect("some key splits");
    let worker = troop_coordinator::money::register_worker(&a.books, key, AT_MS)
        .await
        .expect("registered once its judge followed the account");
    assert_eq!(worker, troop_schemas::WorkerId::from_key(&key));
    a.stop().await;
    sequencer.stop().await.expect("stops");
}
