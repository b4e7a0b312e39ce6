//! Which node owns which ledger partition (CLUSTER.md, "Who judges an
//! account's money"). The ledger partitions are shared among the live nodes by
//! a Kafka consumer group (`<prefix>-owners` on `<prefix>.ledger`): the node
//! assigned partition *p* owns every account in it. A node that leaves (or
//! stops heartbeating for the session timeout) has its partitions handed to
//! the others; nothing but Kafka decides, no other coordination service.
//!
//! The group is for membership only: assigned partitions are paused at once,
//! so the member fetches no records (an owner reads its partition through its
//! own fenced log). Each node records what it owns in `partition_owners`, for
//! the other nodes to find an account's owner. The group alone does not make
//! an owner safe against a paused node that still believes it owns *p*: the
//! owner's transactional writer of *p* fences the previous one (`KafkaLog`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;

use crate::config::ClusterConfig;
use crate::eventlog::EventLogError;

/// How long the member waits in one poll: also how fast it notices `stop`.
const POLL: Duration = Duration::from_millis(100);
/// A member silent this long is dead to the group: its partitions move.
pub const SESSION_TIMEOUT_MS: u32 = 6_000;
/// Most time between two polls of a member (it polls every [`POLL`]), and the
/// longest a rebalance waits for known members.
const MAX_POLL_INTERVAL_MS: u32 = 10_000;

/// The current assignment, shared with the polling thread's callbacks.
type Owned = Arc<Mutex<BTreeSet<i32>>>;

struct OwnerContext {
    owned: Owned,
    changed: tokio::sync::watch::Sender<BTreeSet<i32>>,
}

fn partitions_of(list: &rdkafka::TopicPartitionList) -> BTreeSet<i32> {
    list.elements().iter().map(|e| e.partition()).collect()
}

impl rdkafka::client::ClientContext for OwnerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "partition owners' group");
    }
}

impl ConsumerContext for OwnerContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut owned = self
            .owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match rebalance {
            Rebalance::Assign(list) => {
                // Membership only: the owner reads through its own log.
                if let Err(e) = consumer.pause(list) {
                    tracing::warn!(error = %e, "pausing owned partitions failed");
                }
                owned.extend(partitions_of(list));
            }
            Rebalance::Revoke(list) => {
                for p in partitions_of(list) {
                    owned.remove(&p);
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance failed: owning nothing until the next one");
                owned.clear();
            }
        }
        tracing::info!(partitions = ?*owned, "ledger partitions owned");
        self.changed.send_replace(owned.clone());
    }
}

/// This node's membership of the owners' group, until [`Ownership::stop`].
pub struct Ownership {
    node: String,
    postgres: String,
    owned: Owned,
    stop: Arc<AtomicBool>,
    member: Option<std::thread::JoinHandle<()>>,
    recorder: tokio::task::JoinHandle<()>,
    watch: tokio::sync::watch::Receiver<BTreeSet<i32>>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Ownership {
    /// Joins the group as `node` (a name unique among live nodes). Call it on
    /// a tokio runtime: the recorder of `partition_owners` runs there.
    pub fn start(cluster: &ClusterConfig, node: &str) -> Result<Self, EventLogError> {
        let owned = Owned::default();
        let (changed, watch) = tokio::sync::watch::channel(BTreeSet::new());
        let consumer: BaseConsumer<OwnerContext> = ClientConfig::new()
            .set("bootstrap.servers", &cluster.kafka_brokers)
            .set("group.id", format!("{}-owners", cluster.topic_prefix))
            .set(
                "client.id",
                format!("{}-owners-{node}", cluster.topic_prefix),
            )
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", SESSION_TIMEOUT_MS.to_string())
            .set("heartbeat.interval.ms", "1000")
            // Also how long a rebalance waits for the members it knew to join
            // again: after the broker was unreachable, every member left and
            // rejoins, and a broker that waits for members gone would leave
            // the partitions without owners for librdkafka's default 300 s.
            // The member polls every 100 ms, so it is never this late.
            .set("max.poll.interval.ms", MAX_POLL_INTERVAL_MS.to_string())
            .set("partition.assignment.strategy", "roundrobin")
            .create_with_context(OwnerContext {
                owned: Arc::clone(&owned),
                changed,
            })
            .map_err(|e| EventLogError::Broker(e.to_string()))?;
        consumer
            .subscribe(&[&cluster.topic("ledger")])
            .map_err(|e| EventLogError::Broker(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let member = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("troop-owners".into())
                .spawn(move || {
                    // Polling keeps the membership alive and runs the callbacks.
                    while !stop.load(Ordering::SeqCst) {
                        if let Some(Err(e)) = consumer.poll(POLL) {
                            tracing::warn!(error = %e, "partition owners' group");
                        }
                    }
                    // Leaves the group now, so the others take over at once
                    // instead of after the session timeout.
                    consumer.unsubscribe();
                    let _ = consumer.poll(POLL);
                })
                .map_err(|e| EventLogError::Broker(e.to_string()))?
        };
        let recorder = tokio::spawn(record(
            cluster.postgres.clone(),
            node.to_owned(),
            watch.clone(),
        ));
        Ok(Self {
            node: node.to_owned(),
            postgres: cluster.postgres.clone(),
            owned,
            stop,
            member: Some(member),
            recorder,
            watch,
        })
    }

    /// The ledger partitions this node owns now.
    pub fn owned(&self) -> BTreeSet<i32> {
        self.owned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The owned partitions, told on every change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<BTreeSet<i32>> {
        self.watch.clone()
    }

    /// Leaves the group and removes this node's rows from `partition_owners`.
    pub async fn stop(mut self) -> Result<(), tokio_postgres::Error> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(member) = self.member.take() {
            let _ = tokio::task::spawn_blocking(move || member.join()).await;
        }
        self.recorder.abort();
        let client = super::connect(&self.postgres, "partition owners").await?;
        write_owned(&client, &self.node, &BTreeSet::new()).await
    }
}

/// Makes `partition_owners` say that `node` owns exactly `owned` (rows of
/// partitions another node has since taken are left to it).
async fn write_owned(
    client: &tokio_postgres::Client,
    node: &str,
    owned: &BTreeSet<i32>,
) -> Result<(), tokio_postgres::Error> {
    let owned: Vec<i32> = owned.iter().copied().collect();
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX);
    client
        .execute(
            "delete from partition_owners where node = $1 and not (partition_id = any($2))",
            &[&node, &owned],
        )
        .await?;
    client
        .execute(
            "insert into partition_owners (partition_id, node, since_ms)
             select p, $2, $3 from unnest($1::int[]) as t(p)
             on conflict (partition_id) do update set node = excluded.node, since_ms = excluded.since_ms
             where partition_owners.node <> excluded.node",
            &[&owned, &node, &now_ms],
        )
        .await?;
    Ok(())
}

/// Records every new assignment; a failed write is retried (with the newest
/// assignment) until it lands.
async fn record(
    postgres: String,
    node: String,
    mut watch: tokio::sync::watch::Receiver<BTreeSet<i32>>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    while watch.changed().await.is_ok() {
        loop {
            let owned = watch.borrow_and_update().clone();
            if client
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
            {
                client = super::connect(&postgres, "partition owners").await.ok();
            }
            let written = match &client {
                Some(c) => write_owned(c, &node, &owned)
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("no connection".into()),
            };
            match written {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "recording owned partitions failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Who owns each partition, as `partition_owners` says.
pub async fn owners(
    client: &tokio_postgres::Client,
) -> Result<std::collections::BTreeMap<i32, String>, tokio_postgres::Error> {
    Ok(client
        .query("select partition_id, node from partition_owners", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
