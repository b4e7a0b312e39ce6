//! Owners write judged events to their ledger partitions on a real broker; the
//! sequencer reads every partition from its stored positions and projects into
//! a real Postgres: every entry once, in per-partition order, across restarts
//! and redeliveries. Run as a task on two nodes, one leads, publishes the
//! ledger into Postgres for troop-audit, and the other takes over. Replay
//! rebuilds the same ledger from the broker alone into an empty database.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cluster::{Traffic, leaves, micro, migrated_database, prices};
use common::services::{Broker, Database};
use troop_coordinator::cluster::kafka_log::{KafkaLog, KafkaLogConfig};
use troop_coordinator::cluster::ledger_node::{self, LedgerNode};
use troop_coordinator::cluster::ledger_store::PgLogStore;
use troop_coordinator::cluster::projection::{Checked, LedgerFeed, Sequencer, partition_of};
use troop_coordinator::cluster::projection_store::{PgProjection, ProjectionStore as _};
use troop_coordinator::cluster::replay;
use troop_coordinator::cluster::sequence_log::OrderRecord;
use troop_coordinator::cluster::sequencer::{SequencerProgress, SequencerSettings, SequencerTask};
use troop_coordinator::config::ClusterConfig;
use troop_coordinator::eventlog::EventLog;
use troop_schemas::event::AccountRole;
use troop_schemas::{AccountId, Event, encode_entry};

const PARTITIONS: u32 = 2;

/// A judged ledger event as an owner writes it (tag 0x01, then the entry).
fn ledger_record(event: &Event) -> Vec<u8> {
    troop_coordinator::books::ledger_record(&encode_entry(event).expect("encodes"))
}

fn owner(config: &ClusterConfig, partition: i32) -> KafkaLog {
    KafkaLog::open(KafkaLogConfig::ledger_owner(config, partition)).expect("owner")
}

async fn cluster(prefix: &str) -> (Database, Broker, ClusterConfig, tokio_postgres::Client) {
    common::cluster::cluster(prefix, PARTITIONS).await
}

/// Runs the sequencer until a round finds nothing new; returns the entries
/// it sequenced.
async fn drain(
    sequencer: &mut Sequencer,
    feed: &mut LedgerFeed,
    order: &KafkaLog,
    store: &PgProjection<'_>,
) -> u64 {
    let mut total = 0;
    loop {
        let positions = store.positions().await.expect("positions");
        let (batch, _, read_to) =
            tokio::task::block_in_place(|| feed.poll(&positions, 3)).expect("poll");
        if read_to.is_empty() {
            return total;
        }
        let batch = Checked::check(batch).expect("checks");
        total += sequencer
            .apply(store, Some(order), batch, &read_to)
            .await
            .expect("apply")
            .sequenced;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_is_sequenced_once_across_restarts_and_redeliveries() {
    let (db, _broker, config, client) = cluster("seq").await;
    let topic = "seq.ledger";

    let (a, b) = (AccountId::derive(b"a"), AccountId::derive(b"b"));
    let at_ms = 1_790_000_000_000;
    let opened = |account| Event::AccountOpened {
        account,
        role: AccountRole::Consumer,
        at_ms,
    };
    let grant = |account, n| Event::Grant {
        account,
        amount_micro: micro(n),
        memo: String::new(),
        at_ms,
    };
    let (p0, p1) = (owner(&config, 0), owner(&config, 1));
    let prices = prices(at_ms);
    p0.append(vec![
        ledger_record(&prices),
        ledger_record(&opened(a)),
        // Not a ledger entry (an API key record): read past, never sequenced.
        vec![0x02, b'{', b'}'],
        ledger_record(&grant(a, 1_000)),
    ])
    .expect("append");
    p1.append(vec![
        ledger_record(&opened(b)),
        ledger_record(&grant(b, 500)),
        ledger_record(&Event::Transfer {
            from: b,
            to: a,
            amount_micro: micro(200),
            memo: String::new(),
            at_ms,
        }),
    ])
    .expect("append");

    // A node's metrics count what the sequencer has not read: every record
    // written, the key record too.
    let (http, url) = serve_ledger(&config, std::sync::Arc::default());
    assert_eq!(metrics(&url).await["troop_sequencer_lag_records"], 7.0);

    let mut sequencer = Sequencer::open(&PgProjection::new(&client, topic), PARTITIONS)
        .await
        .expect("open");
    let order = tokio::task::block_in_place(|| KafkaLog::open(KafkaLogConfig::sequencer(&config)))
        .expect("order log");
    let mut feed = tokio::task::block_in_place(|| {
        LedgerFeed::open(&config.kafka_brokers, topic, PARTITIONS, "troop-test-feed")
    })
    .expect("feed");
    assert_eq!(
        drain(
            &mut sequencer,
            &mut feed,
            &order,
            &PgProjection::new(&client, topic)
        )
        .await,
        6
    );
    let positions = PgProjection::new(&client, topic)
        .positions()
        .await
        .expect("positions");
    assert_eq!(
        positions,
        BTreeMap::from([(0, 4), (1, 3)]),
        "the key record counts"
    );
    let m = metrics(&url).await;
    assert_eq!(m["troop_sequencer_lag_records"], 0.0, "{m:?}");
    assert_eq!(
        m["troop_ledger_entries"], 6.0,
        "a standby reads Postgres: {m:?}"
    );
    assert_eq!(m["troop_sequencer_leading"], 0.0, "{m:?}");
    http.stop(true).await;
    let a_balance = sequencer.ledger().account(&a).expect("a").balance();
    assert_eq!(
        a_balance, 1_200,
        "its grant and the transfer from another partition"
    );

    // A fresh sequencer (a restart, or another node after failover) goes on
    // from the stored positions: new records only.
    p0.append(vec![ledger_record(&grant(a, 7))])
        .expect("append");
    // The last leader had decided leaf 6 on troop.sequence and died before
    // its commit; the next one's order log fences it, and decides leaf 6 again.
    order
        .append(vec![OrderRecord::new(6, [(1, 99)]).encode()])
        .expect("the dead leader's last decision");
    let dead = order;
    let order = tokio::task::block_in_place(|| KafkaLog::open(KafkaLogConfig::sequencer(&config)))
        .expect("order log");
    assert!(
        tokio::task::block_in_place(|| dead.append(vec![OrderRecord::new(7, [(1, 98)]).encode()]))
            .is_err(),
        "the old leader's order log is fenced"
    );
    let mut restarted = Sequencer::open(&PgProjection::new(&client, topic), PARTITIONS)
        .await
        .expect("reopen");
    assert_eq!(restarted.tree_size(), 6);
    let mut feed = tokio::task::block_in_place(|| {
        LedgerFeed::open(&config.kafka_brokers, topic, PARTITIONS, "troop-test-feed")
    })
    .expect("feed");
    assert_eq!(
        drain(
            &mut restarted,
            &mut feed,
            &order,
            &PgProjection::new(&client, topic)
        )
        .await,
        1
    );

    // Everything delivered again from the start: nothing is sequenced twice.
    let (again, _, read_to) =
        tokio::task::block_in_place(|| feed.poll(&BTreeMap::new(), 100)).expect("poll");
    assert_eq!(again.len(), 7);
    let again = Checked::check(again).expect("checks");
    let applied = restarted
        .apply(
            &PgProjection::new(&client, topic),
            Some(&order),
            again,
            &read_to,
        )
        .await
        .expect("apply");
    assert_eq!((applied.sequenced, applied.skipped), (0, 7));
    let rows: i64 = client
        .query_one("select count(*) from ledger_entries", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 7);
    // Per-partition order survives the merge: a's grant (p0) and b's transfer
    // (p1) are each after their account's opening.
    let order = leaves(&client).await;
    for partition in [0, 1] {
        let offsets: Vec<u64> = order
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }
    assert_eq!(
        sequence_topic(&config),
        leaves(&client).await,
        "troop.sequence says what Postgres says"
    );

    // Replay follows the successor's decision of leaf 6, not the dead
    // leader's, and reads past the key record.
    let (target, _) = migrated_database().await;
    let replayed = replay::replay(&config, &target.url, signer())
        .await
        .expect("replays");
    assert_eq!(replayed.checkpoint.size, 7);
    let (_, _, differences) = replay::compare(&db.url, &target.url, &signer().verifier())
        .await
        .expect("compares");
    assert_eq!(differences, Vec::<String>::new());
}

/// The order the sequencer's records on the broker decide, as `replay` reads it.
fn sequence_topic(config: &ClusterConfig) -> Vec<(i32, u64)> {
    tokio::task::block_in_place(|| replay::read_order(config))
        .expect("troop.sequence reads")
        .leaves()
        .to_vec()
}

fn signer() -> troop_ledger::note::NoteSigner {
    troop_ledger::note::NoteSigner::new(
        "cluster.example/ledger",
        ed25519_dalek::SigningKey::from_bytes(&[5; 32]),
    )
    .expect("signer")
}

/// A node's `/ledger/` and `/metrics` on a free port, showing `progress`.
fn serve_ledger(
    config: &ClusterConfig,
    progress: std::sync::Arc<SequencerProgress>,
) -> (actix_web::dev::ServerHandle, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = ledger_node::serve(LedgerNode::new(config.clone(), progress), None, listener)
        .expect("serves");
    let handle = server.handle();
    tokio::spawn(server);
    (handle, url)
}

/// A node's `/metrics` at `url`, as name → value.
async fn metrics(url: &str) -> BTreeMap<String, f64> {
    let url = format!("{url}/metrics");
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .expect("metrics")
            .into_string()
            .expect("text")
    })
    .await
    .expect("fetch");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A sequencer task on its own "node", which serves `/ledger/` and
/// `/metrics` at `url`.
struct Node(SequencerTask, actix_web::dev::ServerHandle, String);

impl Node {
    fn start(config: &ClusterConfig) -> Self {
        let mut settings = SequencerSettings::new(config.clone());
        settings.standby_retry = Duration::from_millis(100);
        settings.checkpoint_interval = Duration::from_millis(200);
        let task = SequencerTask::spawn(settings, signer());
        let (handle, url) = serve_ledger(config, std::sync::Arc::clone(&task.progress));
        Self(task, handle, url)
    }

    fn progress(&self) -> &SequencerProgress {
        &self.0.progress
    }

    async fn metrics(&self) -> BTreeMap<String, f64> {
        metrics(&self.2).await
    }

    fn leading(&self) -> bool {
        self.progress().leading.load(Ordering::SeqCst)
    }

    async fn stop(self) {
        self.1.stop(true).await;
        self.0.stop().await.expect("the task ends");
    }
}

/// Waits (bounded) until `ready` holds.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// troop-audit over what Postgres serves as /ledger/, optionally since an
/// older checkpoint; returns the checkpoint it verified.
async fn audit(url: &str, since: Option<String>) -> (troop_audit::Report, String) {
    let store = PgLogStore::connect(url).await.expect("store");
    tokio::task::spawn_blocking(move || {
        let note = troop_ledger::tile::TileSource::read(&store, "checkpoint")
            .expect("read")
            .expect("a checkpoint");
        let report = troop_audit::verify(&store, &signer().verifier(), since.as_deref(), &|_| {})
            .expect("troop-audit accepts the ledger in Postgres");
        (report, String::from_utf8(note).expect("utf-8"))
    })
    .await
    .expect("audit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_leads_publishes_an_audited_ledger_and_another_takes_over() {
    let (db, _broker, config, client) = cluster("lead").await;

    let first = Node::start(&config);
    let second = Node::start(&config);
    until("a leader", || first.leading() || second.leading()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        first.leading() != second.leading(),
        "exactly one node leads"
    );
    let (leader, standby) = if first.leading() {
        (first, second)
    } else {
        (second, first)
    };

    let at_ms = 1_790_000_000_000;
    let accounts: Vec<AccountId> = (0..40u8).map(|n| AccountId::derive(&[n])).collect();
    let (p0, p1) = (owner(&config, 0), owner(&config, 1));
    p0.append(vec![ledger_record(&prices(at_ms))])
        .expect("append");
    // Each account's events in one partition, in rounds that the leader
    // picks up while they are written.
    for (n, account) in accounts.iter().enumerate() {
        let log = if n % 2 == 0 { &p0 } else { &p1 };
        log.append(vec![
            ledger_record(&Event::AccountOpened {
                account: *account,
                role: AccountRole::Consumer,
                at_ms,
            }),
            ledger_record(&Event::Grant {
                account: *account,
                amount_micro: micro(1_000 + n as u64),
                memo: String::new(),
                at_ms,
            }),
        ])
        .expect("append");
    }
    let first_size = 1 + 2 * accounts.len() as u64;
    until("the first entries published", || {
        leader.progress().published.load(Ordering::SeqCst) == first_size
    })
    .await;
    let (report, first_note) = audit(&db.url, None).await;
    assert_eq!(report.entries, first_size);
    // The standby serves the same ledger from Postgres: troop-audit over its
    // HTTP accepts it, and both nodes' metrics say where the ledger is.
    let standby_ledger = format!("{}/ledger/", standby.2);
    let over_http = tokio::task::spawn_blocking(move || {
        let source = troop_audit::Source::open(&standby_ledger).expect("source");
        troop_audit::verify(&source, &signer().verifier(), None, &|_| {})
    })
    .await
    .expect("audit")
    .expect("troop-audit accepts the standby's /ledger/");
    assert_eq!(over_http.entries, first_size);
    for (node, leading) in [(&leader, 1.0), (&standby, 0.0)] {
        let m = node.metrics().await;
        assert_eq!(m["troop_sequencer_leading"], leading, "{m:?}");
        assert_eq!(m["troop_ledger_entries"], first_size as f64, "{m:?}");
        assert_eq!(m["troop_ledger_lag_entries"], 0.0, "{m:?}");
        assert_eq!(m["troop_sequencer_lag_records"], 0.0, "{m:?}");
    }

    // The leader goes away; the standby takes over and goes on.
    leader.stop().await;
    until("the standby leads", || standby.leading()).await;
    for account in &accounts[..10] {
        p0.append(vec![ledger_record(&Event::Grant {
            account: *account,
            amount_micro: micro(5),
            memo: "more".into(),
            at_ms,
        })])
        .expect("append");
    }
    let size = first_size + 10;
    until("the rest published by the new leader", || {
        standby.progress().published.load(Ordering::SeqCst) == size
    })
    .await;
    let (report, _) = audit(&db.url, Some(first_note)).await;
    assert_eq!(report.entries, size);
    assert_eq!(
        report.since_size,
        Some(first_size),
        "the new leader's tree extends the old leader's checkpoint"
    );
    assert_eq!(standby.progress().terms.load(Ordering::SeqCst), 1);
    let rows: i64 = client
        .query_one("select count(*) from ledger_entries", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(u64::try_from(rows).expect("count"), size, "each entry once");
    standby.stop().await;
    assert_eq!(
        sequence_topic(&config),
        leaves(&client).await,
        "both leaders' decisions are on troop.sequence, as Postgres has them"
    );
}

/// `troop-coordinator replay` with the test's cluster and ledger key: its
/// JSON if it succeeded, else what it said on stderr.
fn replay_cli(config: &ClusterConfig, into: &str) -> Result<serde_json::Value, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ledger.key"), hex::encode([5u8; 32])).expect("key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
        .args(["replay", "--json", "--into", into])
        .env("TROOP_DATA_DIR", dir.path())
        .env("TROOP_LEDGER_NAME", "cluster.example/ledger")
        .env("TROOP_CLUSTER__KAFKA_BROKERS", &config.kafka_brokers)
        .env("TROOP_CLUSTER__POSTGRES", &config.postgres)
        .env("TROOP_CLUSTER__TOPIC_PREFIX", &config.topic_prefix)
        .env(
            "TROOP_CLUSTER__LEDGER_PARTITIONS",
            config.ledger_partitions.to_string(),
        )
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    Ok(serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("replay printed no JSON ({e}): {stderr}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_the_live_ledger_from_the_broker_alone() {
    let (db, _broker, config, client) = cluster("replay").await;
    let traffic = Traffic::new(12, 7, 1_790_000_000_000);
    let owners = [owner(&config, 0), owner(&config, 1)];
    let in_partition = |account: &AccountId| {
        &owners[usize::try_from(partition_of(account, PARTITIONS)).expect("small")]
    };

    let first = Node::start(&config);
    until("a leader", || first.leading()).await;
    // The network's own events first: every settlement needs them folded.
    owners[0]
        .append(traffic.setup.iter().map(ledger_record).collect())
        .expect("append");
    let setup = traffic.setup.len() as u64;
    until("the setup sequenced", || {
        first.progress().tree_size.load(Ordering::SeqCst) == setup
    })
    .await;
    // Each consumer's events in its partition, half under each of two
    // leaders, with a record that is not a ledger entry in between.
    let (early, late) = traffic.consumers.split_at(traffic.consumers.len() / 2);
    for (account, events) in early {
        in_partition(account)
            .append(events.iter().map(ledger_record).collect())
            .expect("append");
    }
    owners[1]
        .append(vec![vec![0x02, b'{', b'}']])
        .expect("a key record");
    let half = setup + early.iter().map(|(_, e)| e.len() as u64).sum::<u64>();
    until("the first half published", || {
        first.progress().published.load(Ordering::SeqCst) == half
    })
    .await;
    first.stop().await;
    let second = Node::start(&config);
    for (account, events) in late {
        in_partition(account)
            .append(events.iter().map(ledger_record).collect())
            .expect("append");
    }
    until("everything published by the second leader", || {
        second.progress().published.load(Ordering::SeqCst) == traffic.len()
    })
    .await;
    second.stop().await;
    let open_holds: i64 = client
        .query_one("select count(*) from holds", &[])
        .await
        .expect("holds")
        .get(0);
    assert_eq!(open_holds, 12, "each consumer's last hold is open");
    let (_, live_note) = audit(&db.url, None).await;

    // The CLI rebuilds it into an empty database: same tables, same root.
    let (target, _) = migrated_database().await;
    let out = replay_cli(&config, &target.url).expect("replay succeeds");
    assert_eq!(out["same"], true, "{out}");
    assert_eq!(out["entries"], traffic.len(), "{out}");
    assert!(out["root"].is_string(), "{out}");
    assert_eq!(out["root"], out["live"]["root"], "{out}");
    // The replayed ledger is the live one to an auditor: its checkpoint
    // verifies, and so does its consistency with the live checkpoint.
    let (report, _) = audit(&target.url, Some(live_note)).await;
    assert_eq!(report.entries, traffic.len());
    assert_eq!(report.since_size, Some(traffic.len()));
    // It will only rebuild into an empty database.
    let refused = replay_cli(&config, &target.url).expect_err("a second replay is refused");
    assert!(refused.contains("already holds a ledger"), "{refused}");

    // The comparison sees a balance the live database got wrong.
    let (live, replayed, differences) = replay::compare(&db.url, &target.url, &signer().verifier())
        .await
        .expect("compares");
    assert_eq!((live.tables.len(), differences.len()), (8, 0));
    assert_eq!(live, replayed);
    client
        .execute(
            "update accounts set credits_posted = credits_posted + 1 where role = 'worker'",
            &[],
        )
        .await
        .expect("tamper");
    let (_, _, differences) = replay::compare(&db.url, &target.url, &signer().verifier())
        .await
        .expect("compares");
    assert_eq!(differences, ["table accounts differs"]);
}
