//! The in-memory `ProjectionStore`: the tables as maps. Clones share one
//! store (two sequencers on one store, as two nodes on one database).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;

use troop_ledger::fold::{Hold, Worker};
use troop_schemas::{AccountId, ApiKeyId, HoldId, JobId, WorkerId};

use super::{AccountRow, Commit, ProjectionStore, ReceiptRow};
use crate::cluster::directory::{KeyRow, key_hash};
use crate::cluster::projection::{ProjectionError, Sourced};
use crate::directory::{BanEvent, Directory, KeyEvent};

/// Snapshots kept, as the Postgres store keeps them.
const SNAPSHOTS_KEPT: usize = 2;

#[derive(Debug, Default)]
struct Tables {
    leaves: Vec<Sourced>,
    ids: HashSet<(i32, i64)>,
    positions: BTreeMap<i32, i64>,
    /// Tree size, fold and its BLAKE3 digest.
    snapshots: Vec<(u64, Vec<u8>, [u8; 32])>,
    accounts: BTreeMap<AccountId, AccountRow>,
    holds: BTreeMap<HoldId, Hold>,
    receipts: BTreeMap<JobId, ReceiptRow>,
    registrations: BTreeMap<WorkerId, Worker>,
    network_leaves: BTreeSet<u64>,
    keys: BTreeMap<ApiKeyId, KeyRow>,
    bans: BTreeSet<WorkerId>,
}

impl Tables {
    fn project(&mut self, directory: &[Directory]) {
        for record in directory {
            match record {
                Directory::Key(KeyEvent::Issued {
                    key, account, hash, ..
                }) => {
                    let Some(hash) = key_hash(key, hash) else {
                        continue;
                    };
                    self.keys.entry(*key).or_insert(KeyRow {
                        key: *key,
                        account: *account,
                        hash,
                        revoked: false,
                    });
                }
                Directory::Key(KeyEvent::Revoked { key, .. }) => {
                    if let Some(row) = self.keys.get_mut(key) {
                        row.revoked = true;
                    }
                }
                Directory::Ban(BanEvent::Banned { worker, .. }) => {
                    self.bans.insert(*worker);
                }
            }
        }
    }

    fn store(&mut self, c: &Commit) {
        for leaf in &c.leaves {
            assert!(
                self.ids.insert((leaf.partition, leaf.offset)),
                "the sequencer stores each record once"
            );
            self.leaves.push(leaf.clone());
        }
        for r in &c.receipts {
            self.receipts.entry(r.job).or_insert_with(|| r.clone());
        }
        self.network_leaves.extend(&c.network_leaves);
        for (worker, registered) in &c.registrations {
            self.registrations
                .entry(*worker)
                .or_insert_with(|| registered.clone());
        }
        self.project(&c.directory);
        for a in &c.accounts {
            self.accounts.insert(a.account, a.clone());
        }
        for (id, hold) in &c.holds_opened {
            self.holds.entry(*id).or_insert_with(|| hold.clone());
        }
        for h in &c.holds_closed {
            self.holds.remove(h);
        }
        for (p, next) in &c.read_to {
            let at = self.positions.entry(*p).or_insert(*next);
            *at = (*at).max(*next);
        }
        if let Some(fold) = &c.snapshot {
            let size = c.new_tree_size();
            if !self.snapshots.iter().any(|(s, ..)| *s == size) {
                self.snapshots
                    .push((size, fold.clone(), *blake3::hash(fold).as_bytes()));
                self.snapshots.sort_by_key(|(s, ..)| *s);
            }
            let excess = self.snapshots.len().saturating_sub(SNAPSHOTS_KEPT);
            self.snapshots.drain(..excess);
        }
    }
}

/// The sequencer's projection in memory.
#[derive(Debug, Clone, Default)]
pub struct MemProjection {
    // A tokio mutex: a commit holds it across the caller's `before`, as the
    // Postgres store holds its row lock on the tree size.
    tables: Arc<tokio::sync::Mutex<Tables>>,
}

impl MemProjection {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ProjectionStore for MemProjection {
    async fn tree_size(&self) -> Result<u64, ProjectionError> {
        Ok(self.tables.lock().await.leaves.len() as u64)
    }

    async fn positions(&self) -> Result<BTreeMap<i32, i64>, ProjectionError> {
        Ok(self.tables.lock().await.positions.clone())
    }

    async fn snapshots(&self, tree_size: u64) -> Result<Vec<(u64, Vec<u8>)>, ProjectionError> {
        let t = self.tables.lock().await;
        Ok(t.snapshots
            .iter()
            .rev()
            .filter(|(size, fold, digest)| {
                *size <= tree_size && blake3::hash(fold).as_bytes() == digest
            })
            .map(|(size, fold, _)| (*size, fold.clone()))
            .collect())
    }

    async fn leaves(&self, from: u64, to: u64) -> Result<Vec<(u64, Sourced)>, ProjectionError> {
        let t = self.tables.lock().await;
        let end = usize::try_from(to)
            .unwrap_or(usize::MAX)
            .min(t.leaves.len());
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(end);
        Ok(t.leaves[start..end]
            .iter()
            .zip(from..)
            .map(|(s, i)| (i, s.clone()))
            .collect())
    }

    async fn sequenced_among(
        &self,
        ids: &[(i32, i64)],
    ) -> Result<BTreeSet<(i32, i64)>, ProjectionError> {
        let t = self.tables.lock().await;
        Ok(ids
            .iter()
            .filter(|id| t.ids.contains(id))
            .copied()
            .collect())
    }

    async fn commit<F>(&self, commit: &Commit, before: F) -> Result<(), ProjectionError>
    where
        F: Future<Output = Result<(), ProjectionError>> + Send,
    {
        let mut t = self.tables.lock().await;
        let found = t.leaves.len() as u64;
        if found != commit.tree_size {
            return Err(ProjectionError::Fenced {
                expected: commit.tree_size,
                found,
            });
        }
        before.await?;
        t.store(commit);
        Ok(())
    }

    async fn account(&self, account: &AccountId) -> Result<Option<AccountRow>, ProjectionError> {
        Ok(self.tables.lock().await.accounts.get(account).cloned())
    }

    async fn hold(&self, hold: &HoldId) -> Result<Option<Hold>, ProjectionError> {
        Ok(self.tables.lock().await.holds.get(hold).cloned())
    }

    async fn receipt(&self, job: &JobId) -> Result<Option<ReceiptRow>, ProjectionError> {
        Ok(self.tables.lock().await.receipts.get(job).cloned())
    }

    async fn registration(&self, worker: &WorkerId) -> Result<Option<Worker>, ProjectionError> {
        Ok(self.tables.lock().await.registrations.get(worker).cloned())
    }

    async fn network_leaves(&self) -> Result<Vec<u64>, ProjectionError> {
        Ok(self
            .tables
            .lock()
            .await
            .network_leaves
            .iter()
            .copied()
            .collect())
    }

    async fn directory(&self) -> Result<(Vec<KeyRow>, Vec<WorkerId>), ProjectionError> {
        let t = self.tables.lock().await;
        Ok((
            t.keys.values().cloned().collect(),
            t.bans.iter().copied().collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::MemProjection;

    async fn fresh() -> MemProjection {
        MemProjection::new()
    }

    crate::projection_store_conformance!(fresh);
}
