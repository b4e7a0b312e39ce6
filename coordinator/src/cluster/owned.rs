//! The ledger partitions a node owns (CLUSTER.md, "Who judges an account's
//! money"): each taken over ([`PartitionBooks::take`]: fenced, loaded) when
//! the owners' group assigns it, kept current with the sequenced ledger, and
//! let go when the group takes it away. A partition whose writes fail (its
//! log was fenced by a newer owner, or the broker failed) is let go at once
//! and taken again only if the group still says it is this node's, after a
//! pause: two nodes that both believe they own it fence each other at most
//! once a pause until the group has told them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use troop_ledger::fold::FoldError;
use troop_schemas::Event;

use crate::cluster::idle::IdlePause;
use crate::cluster::owner::{
    FOLLOW_BATCH_ENTRIES, OwnerError, PartitionBooks, Submitted, sequenced_since,
};
use crate::cluster::presence;
use crate::config::ClusterConfig;
use crate::directory::Directory;
use crate::domain::liveness::Suspects;
use crate::eventlog::Pending;

type Shared = Arc<tokio::sync::Mutex<PartitionBooks>>;
type Loaded = Arc<RwLock<BTreeMap<i32, Shared>>>;

/// A node missing this long (about ten missed advertisements) is gone.
pub const DEAD_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct OwnedSettings {
    /// How often the sequenced ledger is folded into every owned partition
    /// (and a change of assignment looked at, if none was told): `first`
    /// while entries keep coming or this node judges, doubling while neither
    /// happens. A change refused for something another partition judged and
    /// this one has not followed yet (an account, a worker, a price schedule)
    /// cuts the pause short, so nothing that waits on a follow waits the
    /// longest pause; what the pause delays is only a credit's arrival in
    /// the books of its account's owner (a worker's earnings).
    pub follow: IdlePause,
    /// The pause before a partition that failed is taken again.
    pub retake_after: Duration,
    /// How often the owned partitions' overdue holds are expired (by the
    /// wall clock); `None`: never (tests whose events carry a fixed clock).
    pub expire_every: Option<Duration>,
    /// How long a node must be seen missing from `nodes` before the holds
    /// of its requests are voided (at the expiry rounds).
    pub dead_after: Duration,
}

impl Default for OwnedSettings {
    fn default() -> Self {
        Self {
            follow: IdlePause {
                first: Duration::from_millis(100),
                max: Duration::from_millis(1_600),
            },
            retake_after: Duration::from_secs(1),
            expire_every: Some(Duration::from_secs(1)),
            dead_after: DEAD_AFTER,
        }
    }
}

/// This node's owned partitions, until [`OwnedBooks::stop`].
#[derive(Debug)]
pub struct OwnedBooks {
    loaded: Loaded,
    signals: Arc<Signals>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// What the judges tell the follow loop.
#[derive(Debug, Default)]
struct Signals {
    /// Changes accepted so far: while it moves, the loop follows at its
    /// shortest pause (what was judged here comes back sequenced).
    judged: AtomicU64,
    /// A change was refused for something not followed yet: follow now.
    behind: tokio::sync::Notify,
}

/// Whether `refusal` may be only this partition's lag behind the sequenced
/// ledger: what another partition judges (an account, a worker) or the
/// price schedule (judged by the schedule's partition).
fn not_followed_yet(refusal: &OwnerError) -> bool {
    matches!(
        refusal,
        OwnerError::Refused(
            FoldError::UnknownAccount(_)
                | FoldError::UnknownWorker(_)
                | FoldError::UnknownScheduleVersion(_)
        )
    )
}

impl OwnedBooks {
    /// Follows `owned` (the owners' group's assignment, from
    /// [`crate::cluster::ownership::Ownership::watch`]). Call it on a tokio runtime.
    pub fn start(
        cluster: ClusterConfig,
        owned: tokio::sync::watch::Receiver<BTreeSet<i32>>,
        settings: OwnedSettings,
    ) -> Self {
        let loaded = Loaded::default();
        let signals = Arc::new(Signals::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(
            cluster,
            owned,
            Arc::clone(&loaded),
            Arc::clone(&signals),
            settings,
            stopped,
        ));
        Self {
            loaded,
            signals,
            stop,
            task,
        }
    }

    /// Partitions taken over and ready to judge.
    pub fn loaded(&self) -> BTreeSet<i32> {
        read(&self.loaded).keys().copied().collect()
    }

    /// Judges `events` in `partition` and queues the accepted ones on its
    /// log ([`PartitionBooks::submit`]); [`OwnerError::NotOwned`] if this node
    /// does not hold it now.
    pub async fn submit(&self, partition: i32, events: &[Event]) -> Result<Submitted, OwnerError> {
        let submitted = self.write(partition, |books| books.submit(events)).await;
        if let Ok((verdicts, _)) = &submitted {
            if verdicts.iter().any(Result::is_ok) {
                self.signals.judged.fetch_add(1, Ordering::Relaxed);
            }
            if verdicts
                .iter()
                .any(|v| v.as_ref().is_err_and(not_followed_yet))
            {
                self.signals.behind.notify_one();
            }
        }
        submitted
    }

    /// Queues directory records on `partition`'s log
    /// ([`PartitionBooks::append`]); [`OwnerError::NotOwned`] if this node
    /// does not hold it now.
    pub async fn append(
        &self,
        partition: i32,
        records: &[Directory],
    ) -> Result<Pending, OwnerError> {
        self.write(partition, |books| books.append(records)).await
    }

    /// `f` on `partition`'s books, which write to its log: a partition whose
    /// write failed is let go.
    async fn write<T>(
        &self,
        partition: i32,
        f: impl FnOnce(&mut PartitionBooks) -> Result<T, OwnerError>,
    ) -> Result<T, OwnerError> {
        let books = read(&self.loaded)
            .get(&partition)
            .cloned()
            .ok_or(OwnerError::NotOwned(partition))?;
        let written = f(&mut *books.lock().await);
        if let Err(OwnerError::EventLog(_) | OwnerError::Poisoned) = &written {
            // Fenced or failed: this copy of the partition judges no more.
            let removed = remove_if_same(&self.loaded, partition, &books);
            drop(books);
            tokio::spawn(let_go(removed.into_iter().collect()));
        }
        written
    }

    /// `f` on the fold of `partition`, if this node holds it.
    pub async fn with_ledger<T>(
        &self,
        partition: i32,
        f: impl FnOnce(&troop_ledger::fold::Ledger) -> T,
    ) -> Option<T> {
        let books = read(&self.loaded).get(&partition).cloned()?;
        let books = books.lock().await;
        Some(f(books.ledger()))
    }

    /// Lets every partition go (its log commits what it has queued) and stops.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

fn read(loaded: &Loaded) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, Shared>> {
    loaded
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(loaded: &Loaded) -> std::sync::RwLockWriteGuard<'_, BTreeMap<i32, Shared>> {
    loaded
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes `partition` out if it is still `books` (not a newer copy).
fn remove_if_same(loaded: &Loaded, partition: i32, books: &Shared) -> Option<Shared> {
    let mut map = write(loaded);
    if map.get(&partition).is_some_and(|b| Arc::ptr_eq(b, books)) {
        map.remove(&partition)
    } else {
        None
    }
}

/// Drops partitions' books off the runtime: closing a log waits for its
/// writer thread to commit what it holds.
async fn let_go(books: Vec<Shared>) {
    if books.is_empty() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || drop(books)).await;
}

async fn run(
    cluster: ClusterConfig,
    mut owned: tokio::sync::watch::Receiver<BTreeSet<i32>>,
    loaded: Loaded,
    signals: Arc<Signals>,
    settings: OwnedSettings,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failed_at: BTreeMap<i32, Instant> = BTreeMap::new();
    let mut expired_at = Instant::now();
    let mut suspects = Suspects::new(settings.dead_after);
    // Rounds in a row that followed nothing and saw nothing judged here.
    let mut quiet: u32 = 1;
    let mut judged = signals.judged.load(Ordering::Relaxed);
    loop {
        // The expiry clock runs on whole seconds whatever the pause.
        let pause = settings.follow.after(quiet);
        let pause = match settings.expire_every {
            Some(every) => pause.min(every.saturating_sub(expired_at.elapsed())),
            None => pause,
        };
        tokio::select! {
            _ = &mut stopped => break,
            told = owned.changed() => if told.is_err() {
                // The membership ended: nothing is owned any more.
                break;
            },
            () = signals.behind.notified() => quiet = 0,
            () = tokio::time::sleep(pause) => {}
        }
        let want = owned.borrow_and_update().clone();
        let gone: Vec<Shared> = {
            let mut map = write(&loaded);
            let revoked: Vec<i32> = map.keys().filter(|p| !want.contains(p)).copied().collect();
            revoked.iter().filter_map(|p| map.remove(p)).collect()
        };
        let_go(gone).await;
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            match crate::cluster::connect(&cluster.postgres, "partition owner").await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "owned partitions wait for postgres");
                    continue;
                }
            }
        }
        let client = client.as_ref().expect("connected above");
        let now = Instant::now();
        let missing: Vec<i32> = {
            let map = read(&loaded);
            want.iter()
                .filter(|p| !map.contains_key(p))
                .copied()
                .collect()
        };
        for p in missing {
            if failed_at
                .get(&p)
                .is_some_and(|at| now.duration_since(*at) < settings.retake_after)
            {
                continue;
            }
            match PartitionBooks::take(client, &cluster, p).await {
                Ok(books) => {
                    tracing::info!(
                        partition = p,
                        tree_size = books.tree_size(),
                        "took a ledger partition over"
                    );
                    failed_at.remove(&p);
                    write(&loaded).insert(p, Arc::new(tokio::sync::Mutex::new(books)));
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "taking a ledger partition over failed");
                    failed_at.insert(p, now);
                }
            }
        }
        let mut diverged = Vec::new();
        let followed = match follow(client, &loaded, &mut diverged).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "following the sequenced ledger failed");
                0
            }
        };
        let judged_now = signals.judged.load(Ordering::Relaxed);
        // A partition assigned here but not held (its take-over failed) is
        // tried again after `retake_after`, not after the longest pause.
        let retaking = read(&loaded).len() < want.len();
        quiet = if followed > 0 || judged_now != judged || retaking {
            1
        } else {
            quiet.saturating_add(1)
        };
        judged = judged_now;
        if let Some(every) = settings.expire_every
            && expired_at.elapsed() >= every
        {
            expired_at = Instant::now();
            let dead = dead_origins(client, &loaded, &mut suspects).await;
            expire(&loaded, crate::server::now_ms(), &dead, &mut diverged).await;
        }
        for (p, books) in diverged {
            failed_at.insert(p, Instant::now());
            let removed = remove_if_same(&loaded, p, &books);
            drop(books);
            let_go(removed.into_iter().collect()).await;
        }
    }
    let all: Vec<Shared> = std::mem::take(&mut *write(&loaded)).into_values().collect();
    let_go(all).await;
}

/// The node incarnations that owned partitions' open holds are for and that
/// have been missing from `nodes` for the settings' `dead_after`. None when
/// `nodes` cannot be read: nobody is judged dead without a look.
async fn dead_origins(
    client: &tokio_postgres::Client,
    loaded: &Loaded,
    suspects: &mut Suspects,
) -> BTreeSet<String> {
    let live = match presence::live_incarnations(client).await {
        Ok(live) => live,
        Err(e) => {
            tracing::warn!(error = %e, "reading which nodes are alive failed");
            return BTreeSet::new();
        }
    };
    let partitions: Vec<Shared> = read(loaded).values().map(Arc::clone).collect();
    let mut origins = BTreeSet::new();
    for books in partitions {
        origins.extend(books.lock().await.origins());
    }
    suspects.look(&origins, &live, Instant::now())
}

/// Expires every owned partition's overdue holds and voids those of dead
/// nodes' requests; a partition whose log failed (fenced) goes to `failed`,
/// to be let go.
async fn expire(
    loaded: &Loaded,
    now_ms: u64,
    dead_origins: &BTreeSet<String>,
    failed: &mut Vec<(i32, Shared)>,
) {
    let partitions: Vec<(i32, Shared)> = read(loaded)
        .iter()
        .map(|(p, b)| (*p, Arc::clone(b)))
        .collect();
    for (p, books) in partitions {
        if failed.iter().any(|(d, _)| *d == p) {
            continue;
        }
        let expired = books.lock().await.expire_due(now_ms, dead_origins);
        match expired {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                partition = p,
                holds = n,
                ?dead_origins,
                "expired or voided holds whose requests were lost"
            ),
            Err(e @ (OwnerError::EventLog(_) | OwnerError::Poisoned)) => {
                tracing::warn!(partition = p, error = %e, "expiring holds failed; letting the partition go");
                failed.push((p, books));
            }
            Err(e) => tracing::error!(partition = p, error = %e, "an expiry was refused"),
        }
    }
}

/// Folds newly sequenced entries into every owned partition, reading them
/// once for all; a partition whose fold disagrees goes to `diverged`, to be
/// let go and taken again. Returns how many entries were read.
async fn follow(
    client: &tokio_postgres::Client,
    loaded: &Loaded,
    diverged: &mut Vec<(i32, Shared)>,
) -> Result<u64, OwnerError> {
    let partitions: Vec<(i32, Shared)> = read(loaded)
        .iter()
        .map(|(p, b)| (*p, Arc::clone(b)))
        .collect();
    let mut from = u64::MAX;
    for (_, books) in &partitions {
        from = from.min(books.lock().await.tree_size());
    }
    if partitions.is_empty() {
        return Ok(0);
    }
    let mut entries = 0u64;
    loop {
        let rows = sequenced_since(client, from).await?;
        let Some(last) = rows.last() else {
            return Ok(entries);
        };
        from = last.leaf + 1;
        entries += rows.len() as u64;
        for (p, books) in &partitions {
            if diverged.iter().any(|(d, _)| d == p) {
                continue;
            }
            if let Err(e) = books.lock().await.fold_all(&rows) {
                tracing::warn!(partition = p, error = %e, "an owned partition diverged; taking it again");
                diverged.push((*p, Arc::clone(books)));
            }
        }
        if rows.len() < FOLLOW_BATCH_ENTRIES {
            return Ok(entries);
        }
    }
}
