//! The sequencer's projection against a real Postgres: batches get gap-free
//! leaf indexes and their balances in one transaction with their offsets; a
//! redelivered event is skipped; the tables say what the fold says; a second
//! sequencer is fenced; a refused event changes nothing in Postgres.

#[allow(dead_code, reason = "shared test helpers")]
mod common;

use std::collections::BTreeMap;

use common::cluster::{account_row, leaves, micro, migrated_database, order_of, prices};
use troop_coordinator::cluster::projection::{
    Applied, Checked, ProjectionError, Sequencer, Sourced, partition_of,
};
use troop_coordinator::cluster::projection_store::conformance::Fixture;
use troop_coordinator::cluster::projection_store::{PgProjection, ProjectionStore as _};
use troop_coordinator::eventlog::EventLog as _;
use troop_coordinator::eventlog::file::{FileLog, FileLogConfig};
use troop_schemas::event::{AccountRole, VoidReason};
use troop_schemas::{AccountId, Event, HoldId, JobId, encode_entry};

const TOPIC: &str = "troop.ledger";
const PARTITIONS: u32 = 4;

/// Each event as the owner of partition 0 produced it, at offsets from `first`.
fn sourced(first: i64, events: &[Event]) -> Vec<Sourced> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| Sourced {
            partition: 0,
            offset: first + i64::try_from(i).expect("small"),
            entry: encode_entry(e).expect("encodes"),
        })
        .collect()
}

/// An order log on disk: what the sequencer writes to `troop.sequence`.
fn order_log() -> (tempfile::TempDir, FileLog) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = FileLog::open(dir.path(), FileLogConfig::default()).expect("order log");
    (dir, log)
}

/// `batch` decoded and its receipts' signatures checked, as the sequencer reads it.
fn checked(batch: &[Sourced]) -> Checked {
    Checked::check(batch.to_vec()).expect("checks")
}

/// How far a batch read each partition: one past its last record.
fn read_to(batch: &[Sourced]) -> BTreeMap<i32, i64> {
    let mut to = BTreeMap::new();
    for s in batch {
        let next = to.entry(s.partition).or_insert(0);
        *next = (*next).max(s.offset + 1);
    }
    to
}

/// A migrated database of its own, with two connections to it (two
/// sequencers on one store).
struct PgStore {
    _db: common::services::Database,
    clients: [tokio_postgres::Client; 2],
}

impl Fixture for PgStore {
    type Store<'a> = PgProjection<'a>;

    fn handle(&self, n: usize) -> PgProjection<'_> {
        PgProjection::new(&self.clients[n], TOPIC)
    }
}

async fn fresh() -> PgStore {
    let (db, first) = migrated_database().await;
    let config = troop_coordinator::config::ClusterConfig {
        postgres: db.url.clone(),
        ..Default::default()
    };
    let second = troop_coordinator::cluster::migrate::connect_postgres(&config)
        .await
        .expect("a second connection");
    PgStore {
        _db: db,
        clients: [first, second],
    }
}

troop_coordinator::projection_store_conformance!(fresh);

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_sequenced_and_projected_with_their_offsets_once() {
    let (_db, client) = migrated_database().await;
    let (_order_dir, order) = order_log();
    let consumer = AccountId::derive(b"consumer");
    let worker = AccountId::derive(b"worker");
    let (h1, h2) = (HoldId([1; 16]), HoldId([2; 16]));
    let at_ms = 1_790_000_000_000;
    let opened = |account, role| Event::AccountOpened {
        account,
        role,
        at_ms,
    };
    let hold = |hold, job: u8, amount| Event::HoldPlaced {
        hold,
        job: JobId([job; 16]),
        account: consumer,
        model: "m".into(),
        amount_micro: micro(amount),
        expires_at_ms: at_ms + 60_000,
        schedule_version: 1,
        at_ms,
        origin: None,
    };
    let first = sourced(
        0,
        &[
            prices(at_ms),
            opened(consumer, AccountRole::Consumer),
            opened(worker, AccountRole::Worker),
            Event::Grant {
                account: consumer,
                amount_micro: micro(1_000_000),
                memo: "welcome".into(),
                at_ms,
            },
            hold(h1, 1, 300_000),
        ],
    );
    let mut sequencer = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("open");
    let applied = sequencer
        .apply(
            &PgProjection::new(&client, TOPIC),
            Some(&order),
            checked(&first),
            &read_to(&first),
        )
        .await
        .expect("apply");
    assert_eq!(
        applied,
        Applied {
            sequenced: 5,
            skipped: 0,
            tree_size: 5,
            entries: first.iter().map(|s| s.entry.clone()).collect(),
        }
    );
    assert_eq!(
        account_row(&client, &consumer).await,
        ("1000000".into(), "0".into(), "300000".into())
    );
    assert_eq!(
        account_row(&client, &AccountId::TREASURY).await,
        ("0".into(), "1000000".into(), "0".into())
    );
    assert_eq!(count(&client, "select count(*) from holds").await, 1);

    // The next batch, with the hold redelivered in the middle of it.
    let mut second = sourced(
        5,
        &[
            Event::HoldVoided {
                hold: h1,
                reason: VoidReason::Failed,
                at_ms,
            },
            Event::Transfer {
                from: consumer,
                to: worker,
                amount_micro: micro(100_000),
                memo: "tip".into(),
                at_ms,
            },
            hold(h2, 2, 200_000),
        ],
    );
    second.insert(1, first[4].clone());
    let applied = sequencer
        .apply(
            &PgProjection::new(&client, TOPIC),
            Some(&order),
            checked(&second),
            &read_to(&second),
        )
        .await
        .expect("apply");
    assert_eq!(
        applied,
        Applied {
            sequenced: 3,
            skipped: 1,
            tree_size: 8,
            // The redelivery is not handed to the log writer again.
            entries: [0, 2, 3].map(|i| second[i].entry.clone()).to_vec(),
        }
    );
    assert_eq!(
        account_row(&client, &consumer).await,
        ("1000000".into(), "100000".into(), "200000".into())
    );
    assert_eq!(
        account_row(&client, &worker).await,
        ("100000".into(), "0".into(), "0".into())
    );
    let holds: Vec<String> = client
        .query("select hold from holds", &[])
        .await
        .expect("holds")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(holds, [h2.to_string()], "the voided hold is gone");
    assert_eq!(
        count(&client, "select count(*) from ledger_entries").await,
        8
    );
    assert_eq!(
        count(
            &client,
            "select max(leaf_index) - min(leaf_index) + 1 from ledger_entries"
        )
        .await,
        8,
        "gap-free"
    );
    let positions = PgProjection::new(&client, TOPIC)
        .positions()
        .await
        .expect("positions");
    assert_eq!(positions.get(&0), Some(&8), "offsets 0..=7 consumed");
    let partition: i32 = client
        .query_one(
            "select ledger_partition from accounts where account = $1",
            &[&consumer.to_string()],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(
        u32::try_from(partition).expect("positive"),
        partition_of(&consumer, PARTITIONS)
    );

    // Every account row is what the fold says.
    for (id, a) in sequencer.ledger().accounts() {
        assert_eq!(
            account_row(&client, id).await,
            (
                a.credits_posted.to_string(),
                a.debits_posted.to_string(),
                a.debits_pending.to_string()
            ),
            "{id}"
        );
    }
    // The order log says what Postgres says: the redelivery is not in it.
    assert_eq!(order.next_offset(), 2, "one record per batch");
    assert_eq!(
        order_of(order.read(0, 1_000).expect("read")).leaves(),
        leaves(&client).await
    );
    // A sequencer opened from Postgres has the same fold.
    let reopened = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("reopen");
    assert_eq!(reopened.tree_size(), 8);
    assert_eq!(
        reopened.ledger().balances_digest(),
        sequencer.ledger().balances_digest()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sequencer_is_fenced_and_a_refused_event_changes_nothing() {
    let (_db, client) = migrated_database().await;
    let (_order_dir, order) = order_log();
    let consumer = AccountId::derive(b"consumer");
    let at_ms = 1_790_000_000_000;
    let mut stale = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("open");
    let mut live = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("open");
    let opened = sourced(
        0,
        &[
            prices(at_ms),
            Event::AccountOpened {
                account: consumer,
                role: AccountRole::Consumer,
                at_ms,
            },
        ],
    );
    live.apply(
        &PgProjection::new(&client, TOPIC),
        Some(&order),
        checked(&opened),
        &read_to(&opened),
    )
    .await
    .expect("apply");
    let fenced = stale
        .apply(
            &PgProjection::new(&client, TOPIC),
            Some(&order),
            checked(&opened),
            &read_to(&opened),
        )
        .await;
    assert!(
        matches!(
            fenced,
            Err(ProjectionError::Fenced {
                expected: 0,
                found: 2
            })
        ),
        "{fenced:?}"
    );

    // A hold the balance cannot cover: the fold refuses it, Postgres keeps
    // what it had, and the sequencer stops until it is reopened.
    let overdraw = sourced(
        2,
        &[Event::HoldPlaced {
            hold: HoldId([9; 16]),
            job: JobId([9; 16]),
            account: consumer,
            model: "m".into(),
            amount_micro: micro(1),
            expires_at_ms: at_ms + 60_000,
            schedule_version: 1,
            at_ms,
            origin: None,
        }],
    );
    let refused = live
        .apply(
            &PgProjection::new(&client, TOPIC),
            Some(&order),
            checked(&overdraw),
            &read_to(&overdraw),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(ProjectionError::Refused(
                troop_coordinator::ledger::fold::FoldError::InsufficientFunds { .. }
            ))
        ),
        "{refused:?}"
    );
    assert_eq!(count(&client, "select tree_size from ledger_head").await, 2);
    assert_eq!(count(&client, "select count(*) from holds").await, 0);
    assert_eq!(
        count(&client, "select count(*) from ledger_entries").await,
        2
    );
    // Neither the fenced nor the refused batch reached the order log.
    assert_eq!(order.next_offset(), 1);
    assert_eq!(
        order_of(order.read(0, 1_000).expect("read")).leaves(),
        leaves(&client).await
    );
    assert!(matches!(
        live.apply(
            &PgProjection::new(&client, TOPIC),
            Some(&order),
            checked(&opened),
            &read_to(&opened)
        )
        .await,
        Err(ProjectionError::Poisoned)
    ));
}

/// Opening folds the newest snapshot and only the entries after it; the
/// newest two are kept; a damaged one is passed over for an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_starts_from_the_newest_sound_snapshot() {
    let (_db, client) = migrated_database().await;
    let (_order_dir, order) = order_log();
    let at_ms = 1_790_000_000_000;
    let mut sequencer = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("open")
        .snapshot_every(4);
    let mut events = vec![prices(at_ms)];
    for n in 0..20u8 {
        events.push(Event::AccountOpened {
            account: AccountId::derive(&[n]),
            role: AccountRole::Consumer,
            at_ms,
        });
    }
    // Batches of 3: snapshots land where a batch crosses a multiple of 4.
    let all = sourced(0, &events);
    for batch in all.chunks(3) {
        sequencer
            .apply(
                &PgProjection::new(&client, TOPIC),
                Some(&order),
                checked(batch),
                &read_to(batch),
            )
            .await
            .expect("apply");
    }
    assert_eq!(sequencer.tree_size(), 21);
    let sizes: Vec<i64> = client
        .query(
            "select tree_size from sequencer_snapshots order by tree_size",
            &[],
        )
        .await
        .expect("snapshots")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sizes, [18, 21], "the newest two, each at a batch's end");

    let reopened = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("reopen");
    assert_eq!(reopened.tree_size(), 21);
    assert_eq!(reopened.ledger(), sequencer.ledger());

    // The newest snapshot damaged, and entries after the older one must be
    // folded: the result is the same.
    client
        .execute(
            "update sequencer_snapshots set fold = fold || '\\x00'::bytea where tree_size = 21",
            &[],
        )
        .await
        .expect("damage");
    let reopened = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("reopen");
    assert_eq!(reopened.ledger(), sequencer.ledger());
    // Without snapshots at all: a full fold, the same again.
    client
        .execute("delete from sequencer_snapshots", &[])
        .await
        .expect("delete");
    let reopened = Sequencer::open(&PgProjection::new(&client, TOPIC), PARTITIONS)
        .await
        .expect("reopen");
    assert_eq!(reopened.ledger(), sequencer.ledger());
}
