//! What the cluster tests share: a migrated database of their own, and the
//! ledger events they build on.
#![allow(dead_code, reason = "each test binary uses a different part")]

use ed25519_dalek::SigningKey;
use troop_coordinator::cluster::migrate::{connect_postgres, migrate_kafka, migrate_postgres};
use troop_coordinator::cluster::projection_store::conformance;
use troop_coordinator::cluster::sequence_log::{Order, OrderRecord};
use troop_coordinator::config::ClusterConfig;
use troop_coordinator::eventlog::Record;
use troop_ledger::fold::{Ledger, Schedule};
use troop_ledger::receipt::public_key;
use troop_schemas::event::{AccountRole, KeyRole, VoidReason};
use troop_schemas::{AccountId, CreditsMicro, Event, HoldId, JobId, WorkerId};

use super::services::{Broker, BrokerKind, Database};

pub fn micro(n: u64) -> CreditsMicro {
    CreditsMicro::new(n).expect("small")
}

pub use troop_coordinator::cluster::projection_store::conformance::{Job, prices};

/// A fresh database with every migration applied, and a client on it.
pub async fn migrated_database() -> (Database, tokio_postgres::Client) {
    let db = Database::create();
    let config = ClusterConfig {
        postgres: db.url.clone(),
        ..ClusterConfig::default()
    };
    let mut client = connect_postgres(&config).await.expect("postgres");
    migrate_postgres(&mut client).await.expect("migrate");
    (db, client)
}

/// A database and a noida-db broker of their own, migrated, with topics
/// named from `prefix` and `ledger_partitions` ledger partitions, and a
/// client on the database.
pub async fn cluster(
    prefix: &str,
    ledger_partitions: u32,
) -> (Database, Broker, ClusterConfig, tokio_postgres::Client) {
    cluster_on(Database::create(), prefix, ledger_partitions).await
}

/// [`cluster`] on the database `db`.
pub async fn cluster_on(
    db: Database,
    prefix: &str,
    ledger_partitions: u32,
) -> (Database, Broker, ClusterConfig, tokio_postgres::Client) {
    cluster_with(db, |brokers, postgres| ClusterConfig {
        kafka_brokers: brokers.into(),
        postgres: postgres.into(),
        topic_prefix: prefix.into(),
        ledger_partitions,
        worker_partitions: 1,
        replication_factor: 1,
        ..ClusterConfig::default()
    })
    .await
}

/// [`cluster_on`] with the configuration `config(brokers, postgres)`.
pub async fn cluster_with(
    db: Database,
    config: impl FnOnce(&str, &str) -> ClusterConfig,
) -> (Database, Broker, ClusterConfig, tokio_postgres::Client) {
    let broker = Broker::start(BrokerKind::Noida);
    let config = config(&broker.brokers, &db.url);
    let mut client = connect_postgres(&config).await.expect("postgres");
    migrate_postgres(&mut client).await.expect("migrate");
    migrate_kafka(&config).await.expect("topics");
    (db, broker, config, client)
}

/// (credits, debits, pending) of an account as Postgres has it, in decimal.
pub async fn account_row(
    client: &tokio_postgres::Client,
    account: &AccountId,
) -> (String, String, String) {
    let r = client
        .query_one(
            "select credits_posted::text, debits_posted::text, debits_pending::text from accounts where account = $1",
            &[&account.to_string()],
        )
        .await
        .expect("account row");
    (r.get(0), r.get(1), r.get(2))
}

/// The leaves in Postgres, in order, as (partition, record number).
pub async fn leaves(client: &tokio_postgres::Client) -> Vec<(i32, u64)> {
    client
        .query(
            "select partition_id, event_offset from ledger_entries order by leaf_index",
            &[],
        )
        .await
        .expect("leaves")
        .iter()
        .map(|r| {
            (
                r.get(0),
                u64::try_from(r.get::<_, i64>(1)).expect("positive"),
            )
        })
        .collect()
}

/// The order that the sequencer's records (as read from its order log) decide.
pub fn order_of(records: impl IntoIterator<Item = Record>) -> Order {
    let mut order = Order::default();
    for r in records {
        order
            .push(&OrderRecord::decode(&r.payload).expect("decodes"))
            .expect("no gap");
    }
    order
}

/// A small network's ledger with real money movement, in an order the fold
/// accepts: `setup` (the coordinator's key, prices, a registered worker; the
/// network's, not an account's) and, per consumer, its own events (opened,
/// funded, then `jobs` jobs: settled with a worker-signed, countersigned
/// receipt, every third voided, the last one left open).
pub struct Traffic {
    pub setup: Vec<Event>,
    pub consumers: Vec<(AccountId, Vec<Event>)>,
}

impl Traffic {
    /// The coordinator key the setup publishes.
    pub fn coordinator() -> SigningKey {
        SigningKey::from_bytes(&[31; 32])
    }

    /// The one worker the setup registers.
    pub fn worker() -> SigningKey {
        SigningKey::from_bytes(&[32; 32])
    }

    /// `job` settled for `input` and `output` tokens: served by the setup's
    /// worker, countersigned by `coordinator`, charged at `schedule`.
    pub fn settlement(
        job: &Job,
        (input, output): (u64, u64),
        schedule: &Schedule,
        coordinator: &SigningKey,
        at_ms: u64,
    ) -> Event {
        conformance::settlement(
            job,
            (input, output),
            schedule,
            (&Self::worker(), coordinator),
            at_ms,
        )
    }

    pub fn new(consumers: u8, jobs: u8, at_ms: u64) -> Self {
        let coordinator = Self::coordinator();
        let worker_key = Self::worker();
        let worker_pk = public_key(&worker_key);
        let worker = WorkerId::from_key(&worker_pk);
        let worker_account = AccountId::derive(&worker_pk.0);
        let setup = vec![
            Event::KeyRotated {
                role: KeyRole::Coordinator,
                name: "coordinator-1".into(),
                key: public_key(&coordinator),
                at_ms,
            },
            prices(at_ms),
            Event::AccountOpened {
                account: worker_account,
                role: AccountRole::Worker,
                at_ms,
            },
            Event::WorkerRegistered {
                worker,
                key: worker_pk,
                account: worker_account,
                at_ms,
            },
        ];
        let mut fold = Ledger::new();
        for e in &setup {
            fold.apply(e).expect("setup folds");
        }
        let schedule = fold.schedule().expect("published").clone();
        let consumers = (0..consumers)
            .map(|c| {
                let account = AccountId::derive(&[b'c', c]);
                let mut events = vec![
                    Event::AccountOpened {
                        account,
                        role: AccountRole::Consumer,
                        at_ms,
                    },
                    Event::Grant {
                        account,
                        amount_micro: micro(1_000_000),
                        memo: String::new(),
                        at_ms,
                    },
                ];
                for j in 0..jobs {
                    let id = [b'j', c, j];
                    let (hold, job) = (HoldId::derive(&id), JobId::derive(&id));
                    let reserved = micro(50_000);
                    events.push(Event::HoldPlaced {
                        hold,
                        job,
                        account,
                        model: "m".into(),
                        amount_micro: reserved,
                        expires_at_ms: at_ms + 600_000,
                        schedule_version: schedule.version,
                        at_ms,
                        origin: None,
                    });
                    if j + 1 == jobs {
                        continue;
                    }
                    if j % 3 == 2 {
                        events.push(Event::HoldVoided {
                            hold,
                            reason: VoidReason::Failed,
                            at_ms: at_ms + 1,
                        });
                        continue;
                    }
                    let job = Job {
                        hold,
                        job,
                        consumer: account,
                        reserved,
                    };
                    events.push(Self::settlement(
                        &job,
                        (10 + u64::from(j), 1 + u64::from(c)),
                        &schedule,
                        &coordinator,
                        at_ms + 2,
                    ));
                }
                (account, events)
            })
            .collect();
        Self { setup, consumers }
    }

    /// Entries in all.
    pub fn len(&self) -> u64 {
        (self.setup.len() + self.consumers.iter().map(|(_, e)| e.len()).sum::<usize>()) as u64
    }
}

/// Every event the sequencer put in the ledger, in the ledger's order.
pub async fn ledger_events(client: &tokio_postgres::Client) -> Vec<Event> {
    client
        .query("select entry from ledger_entries order by leaf_index", &[])
        .await
        .expect("entries")
        .iter()
        .map(|r| troop_schemas::decode_entry(r.get(0)).expect("an entry"))
        .collect()
}

/// How many of `events` void a hold because its node died.
pub fn dead_node_voids(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::HoldVoided {
                    reason: VoidReason::CoordinatorRestart,
                    ..
                }
            )
        })
        .count()
}
