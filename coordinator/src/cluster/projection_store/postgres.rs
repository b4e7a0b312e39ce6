//! The Postgres `ProjectionStore`: the tables every node reads (balances,
//! holds, receipts, the ledger's entries) and the sequencer's own (positions,
//! snapshots, the tree size). A batch is a handful of statements whatever its
//! size: rows go in as arrays.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use troop_ledger::fold::{Account, Hold, Worker};
use troop_schemas::{AccountId, HoldId, JobId, WorkerId};

use super::{AccountRow, Commit, ProjectionStore, ReceiptRow};
use crate::cluster::directory::{KeyRow, changes_since};
use crate::cluster::projection::{ProjectionError, SEQUENCER_GROUP, Sourced};
use crate::cluster::rows::{self, ACCOUNT_COLUMNS, HOLD_COLUMNS};

/// The sequencer's projection in the cluster's database.
///
/// Commits run `begin` .. `commit` on the shared client (readers such as a
/// partition owner's load hold only a `&Client`): while one runs, nothing
/// else may use the client, and a commit whose future is dropped halfway
/// leaves its connection inside the transaction, to be dropped with it (the
/// sequencer ends its term, and its connection, on any error).
#[derive(Debug, Clone, Copy)]
pub struct PgProjection<'c> {
    client: &'c tokio_postgres::Client,
    /// The ledger topic, whose partitions' positions are kept.
    topic: &'c str,
}

impl<'c> PgProjection<'c> {
    pub fn new(client: &'c tokio_postgres::Client, topic: &'c str) -> Self {
        Self { client, topic }
    }
}

/// Where the sequencer goes on reading each partition of `topic`.
pub async fn positions(
    client: &tokio_postgres::Client,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, tokio_postgres::Error> {
    Ok(client
        .query(
            "select partition_id, next_offset from consumer_offsets where consumer_group = $1 and topic = $2",
            &[&SEQUENCER_GROUP, &topic],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgProjection<'_> {
    /// Every row of `c` but the tree size, in the open transaction.
    async fn write(&self, c: &Commit) -> Result<(), ProjectionError> {
        let tx = self.client;
        // The two largest inserts of a batch (every leaf, every receipt) go
        // in as binary COPY: about 1.7× faster than `insert … unnest` for a
        // round of 12,288 entries on this machine (BENCHMARKS.md, run 7).
        if !c.leaves.is_empty() {
            let sink = tx
                .copy_in(
                    "copy ledger_entries (leaf_index, partition_id, event_offset, entry) from stdin binary",
                )
                .await?;
            let rows =
                BinaryCopyInWriter::new(sink, &[Type::INT8, Type::INT4, Type::INT8, Type::BYTEA]);
            let mut rows = std::pin::pin!(rows);
            for (leaf, s) in (c.tree_size..).zip(&c.leaves) {
                let entry: &[u8] = &s.entry;
                rows.as_mut()
                    .write(&[&to_i64(leaf), &s.partition, &s.offset, &entry])
                    .await?;
            }
            rows.finish().await?;
        }
        if !c.receipts.is_empty() {
            let sink = tx
                .copy_in(
                    "copy receipts (job, leaf_index, consumer, worker, charged_micro, worker_earned_micro, fee_micro)
                     from stdin binary",
                )
                .await?;
            let rows = BinaryCopyInWriter::new(
                sink,
                &[
                    Type::TEXT,
                    Type::INT8,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT8,
                    Type::INT8,
                    Type::INT8,
                ],
            );
            let mut rows = std::pin::pin!(rows);
            for r in &c.receipts {
                rows.as_mut()
                    .write(&[
                        &r.job.to_string(),
                        &to_i64(r.leaf),
                        &r.consumer.to_string(),
                        &r.worker.to_string(),
                        &to_i64(r.charged_micro),
                        &to_i64(r.worker_earned_micro),
                        &to_i64(r.fee_micro),
                    ])
                    .await?;
            }
            rows.finish().await?;
        }
        if !c.network_leaves.is_empty() {
            let leaves: Vec<i64> = c.network_leaves.iter().map(|l| to_i64(*l)).collect();
            tx.execute(
                "insert into network_entries (leaf_index) select * from unnest($1::bigint[])",
                &[&leaves],
            )
            .await?;
        }
        if !c.registrations.is_empty() {
            let workers: Vec<String> = c
                .registrations
                .iter()
                .map(|(worker, _)| worker.to_string())
                .collect();
            let keys: Vec<&[u8]> = c
                .registrations
                .iter()
                .map(|(_, w)| w.key.0.as_slice())
                .collect();
            let accounts: Vec<String> = c
                .registrations
                .iter()
                .map(|(_, w)| w.account.to_string())
                .collect();
            tx.execute(
                "insert into worker_registrations (worker, worker_key, account)
                 select * from unnest($1::text[], $2::bytea[], $3::text[])",
                &[&workers, &keys, &accounts],
            )
            .await?;
        }
        crate::cluster::directory::project(tx, &c.directory).await?;
        self.write_accounts(&c.accounts).await?;
        self.write_holds(&c.holds_opened, &c.holds_closed).await?;
        let (parts, nexts): (Vec<i32>, Vec<i64>) = c.read_to.iter().map(|(p, n)| (*p, *n)).unzip();
        tx.execute(
            "insert into consumer_offsets (consumer_group, topic, partition_id, next_offset)
             select $1, $2, p, n from unnest($3::int[], $4::bigint[]) as t(p, n)
             on conflict (consumer_group, topic, partition_id) do update
             set next_offset = greatest(consumer_offsets.next_offset, excluded.next_offset)",
            &[&SEQUENCER_GROUP, &self.topic, &parts, &nexts],
        )
        .await?;
        if let Some(fold) = &c.snapshot {
            let digest = blake3::hash(fold);
            tx.execute(
                "insert into sequencer_snapshots (tree_size, fold, digest) values ($1, $2, $3)
                 on conflict (tree_size) do nothing",
                &[
                    &to_i64(c.new_tree_size()),
                    fold,
                    &digest.as_bytes().as_slice(),
                ],
            )
            .await?;
            tx.execute(
                "delete from sequencer_snapshots where tree_size not in
                 (select tree_size from sequencer_snapshots order by tree_size desc limit 2)",
                &[],
            )
            .await?;
        }
        Ok(())
    }

    async fn write_accounts(&self, accounts: &[AccountRow]) -> Result<(), ProjectionError> {
        if accounts.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = accounts.iter().map(|a| a.account.to_string()).collect();
        let roles: Vec<Option<String>> = accounts
            .iter()
            .map(|a| a.state.role.map(rows::role_name))
            .collect();
        let partitions: Vec<i32> = accounts
            .iter()
            .map(|a| i32::try_from(a.partition).unwrap_or(0))
            .collect();
        let amount = |f: fn(&Account) -> u128| {
            accounts
                .iter()
                .map(|a| f(&a.state).to_string())
                .collect::<Vec<_>>()
        };
        self.client
            .execute(
                "insert into accounts (account, role, ledger_partition, debits_posted, credits_posted, debits_pending)
                 select a, r, p, dp::numeric, cp::numeric, dq::numeric
                 from unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[]) as t(a, r, p, dp, cp, dq)
                 on conflict (account) do update set role = excluded.role,
                   debits_posted = excluded.debits_posted, credits_posted = excluded.credits_posted,
                   debits_pending = excluded.debits_pending",
                &[
                    &ids,
                    &roles,
                    &partitions,
                    &amount(|a| a.debits_posted),
                    &amount(|a| a.credits_posted),
                    &amount(|a| a.debits_pending),
                ],
            )
            .await?;
        Ok(())
    }

    async fn write_holds(
        &self,
        opened: &[(HoldId, Hold)],
        closed: &[HoldId],
    ) -> Result<(), ProjectionError> {
        if !opened.is_empty() {
            let text =
                |f: fn(&Hold) -> String| opened.iter().map(|(_, h)| f(h)).collect::<Vec<_>>();
            let int =
                |f: fn(&Hold) -> u64| opened.iter().map(|(_, h)| to_i64(f(h))).collect::<Vec<_>>();
            let ids: Vec<String> = opened.iter().map(|(id, _)| id.to_string()).collect();
            let origins: Vec<Option<&str>> =
                opened.iter().map(|(_, h)| h.origin.as_deref()).collect();
            self.client
                .execute(
                    "insert into holds (hold, account, job, model, amount_micro, expires_at_ms, schedule_version, origin_node)
                     select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::text[])
                     on conflict (hold) do nothing",
                    &[
                        &ids,
                        &text(|h| h.account.to_string()),
                        &text(|h| h.job.to_string()),
                        &text(|h| h.model.clone()),
                        &int(|h| h.amount.get()),
                        &int(|h| h.expires_at_ms),
                        &int(|h| h.schedule_version),
                        &origins,
                    ],
                )
                .await?;
        }
        if !closed.is_empty() {
            let closed: Vec<String> = closed.iter().map(ToString::to_string).collect();
            self.client
                .execute("delete from holds where hold = any($1)", &[&closed])
                .await?;
        }
        Ok(())
    }

    /// Moves the tree size from `commit.tree_size` to its new size, holding
    /// the row until the transaction ends; fenced if another sequencer moved it.
    async fn fence(&self, commit: &Commit) -> Result<(), ProjectionError> {
        let moved = self
            .client
            .execute(
                "update ledger_head set tree_size = $1 where tree_size = $2",
                &[&to_i64(commit.new_tree_size()), &to_i64(commit.tree_size)],
            )
            .await?;
        if moved == 1 {
            return Ok(());
        }
        Err(ProjectionError::Fenced {
            expected: commit.tree_size,
            found: self.tree_size().await?,
        })
    }
}

impl ProjectionStore for PgProjection<'_> {
    async fn tree_size(&self) -> Result<u64, ProjectionError> {
        let head: i64 = self
            .client
            .query_one("select tree_size from ledger_head", &[])
            .await?
            .get(0);
        Ok(to_u64(head))
    }

    async fn positions(&self) -> Result<BTreeMap<i32, i64>, ProjectionError> {
        Ok(positions(self.client, self.topic).await?)
    }

    async fn snapshots(&self, tree_size: u64) -> Result<Vec<(u64, Vec<u8>)>, ProjectionError> {
        let rows = self
            .client
            .query(
                "select tree_size, fold, digest from sequencer_snapshots where tree_size <= $1 order by tree_size desc",
                &[&to_i64(tree_size)],
            )
            .await?;
        let mut sound = Vec::new();
        for row in rows {
            let size: i64 = row.get(0);
            let (fold, digest): (Vec<u8>, &[u8]) = (row.get(1), row.get(2));
            if blake3::hash(&fold).as_bytes().as_slice() != digest {
                tracing::warn!(
                    tree_size = size,
                    "sequencer snapshot is damaged; trying an older one"
                );
                continue;
            }
            sound.push((to_u64(size), fold));
        }
        Ok(sound)
    }

    async fn leaves(&self, from: u64, to: u64) -> Result<Vec<(u64, Sourced)>, ProjectionError> {
        Ok(self
            .client
            .query(
                "select leaf_index, partition_id, event_offset, entry from ledger_entries
                 where leaf_index >= $1 and leaf_index < $2 order by leaf_index",
                &[&to_i64(from), &to_i64(to)],
            )
            .await?
            .into_iter()
            .map(|row| {
                (
                    to_u64(row.get(0)),
                    Sourced {
                        partition: row.get(1),
                        offset: row.get(2),
                        entry: row.get(3),
                    },
                )
            })
            .collect())
    }

    async fn sequenced_among(
        &self,
        ids: &[(i32, i64)],
    ) -> Result<BTreeSet<(i32, i64)>, ProjectionError> {
        if ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let (parts, offsets): (Vec<i32>, Vec<i64>) = ids.iter().copied().unzip();
        Ok(self
            .client
            .query(
                "select partition_id, event_offset from ledger_entries
                 join unnest($1::int[], $2::bigint[]) as t(p, o)
                 on partition_id = p and event_offset = o",
                &[&parts, &offsets],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    async fn commit<F>(&self, commit: &Commit, before: F) -> Result<(), ProjectionError>
    where
        F: Future<Output = Result<(), ProjectionError>> + Send,
    {
        self.client.batch_execute("begin").await?;
        // The tree size first: its row lock keeps a second sequencer
        // from writing the same leaves until this one ends.
        let written = async {
            self.fence(commit).await?;
            self.write(commit).await?;
            before.await
        }
        .await;
        match written {
            Ok(()) => Ok(self.client.batch_execute("commit").await?),
            Err(e) => {
                // The batch's own error is the one to report; a rollback that
                // fails too means the connection is gone, which ends the
                // transaction as well.
                if let Err(r) = self.client.batch_execute("rollback").await {
                    tracing::warn!(error = %r, "rolling back a failed projection commit");
                }
                Err(e)
            }
        }
    }

    async fn account(&self, account: &AccountId) -> Result<Option<AccountRow>, ProjectionError> {
        let Some(row) = self
            .client
            .query_opt(
                &format!(
                    "select {ACCOUNT_COLUMNS}, a.ledger_partition from accounts a where a.account = $1"
                ),
                &[&account.to_string()],
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(AccountRow {
            account: *account,
            partition: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
            state: rows::account_of(&row, 0)?,
        }))
    }

    async fn hold(&self, hold: &HoldId) -> Result<Option<Hold>, ProjectionError> {
        let Some(row) = self
            .client
            .query_opt(
                &format!("select {HOLD_COLUMNS} from holds h where h.hold = $1"),
                &[&hold.to_string()],
            )
            .await?
        else {
            return Ok(None);
        };
        let (stored, h) = rows::hold_of(&row, 0)?;
        assert_eq!(stored, *hold, "read by its key");
        Ok(Some(h))
    }

    async fn receipt(&self, job: &JobId) -> Result<Option<ReceiptRow>, ProjectionError> {
        let Some(row) = self
            .client
            .query_opt(
                "select leaf_index, consumer, worker, charged_micro, worker_earned_micro, fee_micro
                 from receipts where job = $1",
                &[&job.to_string()],
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(ReceiptRow {
            job: *job,
            leaf: to_u64(row.get(0)),
            consumer: rows::parse("account", row.get(1))?,
            worker: rows::parse("worker", row.get(2))?,
            charged_micro: to_u64(row.get(3)),
            worker_earned_micro: to_u64(row.get(4)),
            fee_micro: to_u64(row.get(5)),
        }))
    }

    async fn registration(&self, worker: &WorkerId) -> Result<Option<Worker>, ProjectionError> {
        Ok(rows::registration(self.client, worker).await?)
    }

    async fn network_leaves(&self) -> Result<Vec<u64>, ProjectionError> {
        Ok(self
            .client
            .query(
                "select leaf_index from network_entries order by leaf_index",
                &[],
            )
            .await?
            .iter()
            .map(|r| to_u64(r.get(0)))
            .collect())
    }

    async fn directory(&self) -> Result<(Vec<KeyRow>, Vec<WorkerId>), ProjectionError> {
        let (mut keys, mut bans) = (BTreeMap::new(), BTreeSet::new());
        let mut since = 0;
        loop {
            let changes = changes_since(self.client, since).await?;
            if changes.newest == since {
                break;
            }
            since = changes.newest;
            keys.extend(changes.keys.into_iter().map(|k| (k.key, k)));
            bans.extend(changes.bans);
        }
        Ok((keys.into_values().collect(), bans.into_iter().collect()))
    }
}
