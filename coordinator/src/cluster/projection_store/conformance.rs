//! One suite every [`ProjectionStore`] adapter must pass, driven through the
//! real [`Sequencer`] with real signed receipts. A [`Fixture`] is one fresh,
//! empty store; its handles share it (two sequencers on one store).

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use troop_ledger::fold::{Account, Hold, Schedule, Worker};
use troop_ledger::receipt::{countersign, public_key, sign_receipt};
use troop_schemas::event::{AccountRole, KeyRole, ModelPrice, VoidReason};
use troop_schemas::{
    AccountId, ApiKeyId, CreditsMicro, Digest, Event, HoldId, JobId, Receipt, WorkerId,
    encode_entry,
};

use super::{AccountRow, Commit, MemProjection, ProjectionStore, ReceiptRow};
use crate::cluster::directory::KeyRow;
use crate::cluster::projection::{
    Applied, Checked, ProjectionError, Sequencer, Sourced, partition_of,
};
use crate::directory::{BanEvent, Directory, KeyEvent};

const PARTITIONS: u32 = 4;
const AT_MS: u64 = 1_790_000_000_000;

/// A fresh store and handles on it.
pub trait Fixture: Send + Sync {
    type Store<'a>: ProjectionStore
    where
        Self: 'a;

    /// A handle on the store; `n` (0 or 1) picks a connection of its own
    /// where the adapter has connections.
    fn handle(&self, n: usize) -> Self::Store<'_>;
}

impl Fixture for MemProjection {
    type Store<'a> = MemProjection;

    fn handle(&self, _n: usize) -> MemProjection {
        self.clone()
    }
}

fn micro(n: u64) -> CreditsMicro {
    CreditsMicro::new(n).expect("small")
}

/// The one schedule the suite prices at.
pub fn prices(at_ms: u64) -> Event {
    Event::PriceSchedulePublished {
        version: 1,
        fee_bps: 500,
        prices: vec![ModelPrice {
            model: "m".into(),
            input_micro_per_1k: micro(1_000),
            output_micro_per_1k: micro(3_000),
        }],
        at_ms,
    }
}

/// What a settled hold names.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub hold: HoldId,
    pub job: JobId,
    pub consumer: AccountId,
    pub reserved: CreditsMicro,
}

/// `job` settled for `(input, output)` tokens by `worker_key`, countersigned
/// by `coordinator`, charged at `schedule` (model `m`).
pub fn settlement(
    job: &Job,
    (input, output): (u64, u64),
    schedule: &Schedule,
    (worker_key, coordinator): (&SigningKey, &SigningKey),
    at_ms: u64,
) -> Event {
    let worker_pk = public_key(worker_key);
    let body = Receipt {
        job: job.job,
        hold: job.hold,
        consumer: job.consumer,
        worker: WorkerId::from_key(&worker_pk),
        worker_key: worker_pk,
        model: "m".into(),
        input_tokens: input,
        output_tokens: output,
        request_digest: Digest::of(&job.job.0),
        response_digest: Digest::of(&job.hold.0),
        started_at_ms: at_ms,
        finished_at_ms: at_ms,
    };
    let sig = sign_receipt(worker_key, &body).expect("signs");
    let receipt = countersign(coordinator, body, sig, input, output).expect("countersigns");
    let charge = schedule
        .charge("m", input, output, job.reserved)
        .expect("priced");
    Event::HoldSettled {
        hold: job.hold,
        receipt,
        charged_micro: micro(charge.charged),
        worker_earned_micro: micro(charge.earned),
        fee_micro: micro(charge.fee),
        at_ms,
    }
}

/// The suite's network: keys, a price schedule, a worker, a consumer with
/// credits and two holds.
struct Net {
    coordinator: SigningKey,
    worker_key: SigningKey,
    worker: WorkerId,
    worker_account: AccountId,
    consumer: AccountId,
    jobs: [Job; 2],
    schedule: Schedule,
}

impl Net {
    fn new() -> Self {
        let (coordinator, worker_key) = (
            SigningKey::from_bytes(&[41; 32]),
            SigningKey::from_bytes(&[42; 32]),
        );
        let worker_pk = public_key(&worker_key);
        let consumer = AccountId::derive(b"conformance consumer");
        let job = |n: u8, reserved| Job {
            hold: HoldId::derive(&[b'h', n]),
            job: JobId::derive(&[b'j', n]),
            consumer,
            reserved: micro(reserved),
        };
        let mut fold = troop_ledger::fold::Ledger::new();
        fold.apply(&prices(AT_MS)).expect("prices fold");
        Self {
            worker: WorkerId::from_key(&worker_pk),
            worker_account: AccountId::derive(&worker_pk.0),
            coordinator,
            worker_key,
            consumer,
            jobs: [job(1, 300_000), job(2, 200_000)],
            schedule: fold.schedule().expect("published").clone(),
        }
    }

    /// Everything up to two open holds: 9 entries.
    fn opening(&self) -> Vec<Event> {
        let mut events = vec![
            Event::KeyRotated {
                role: KeyRole::Coordinator,
                name: "coordinator-1".into(),
                key: public_key(&self.coordinator),
                at_ms: AT_MS,
            },
            prices(AT_MS),
            Event::AccountOpened {
                account: self.worker_account,
                role: AccountRole::Worker,
                at_ms: AT_MS,
            },
            Event::WorkerRegistered {
                worker: self.worker,
                key: public_key(&self.worker_key),
                account: self.worker_account,
                at_ms: AT_MS,
            },
            Event::AccountOpened {
                account: self.consumer,
                role: AccountRole::Consumer,
                at_ms: AT_MS,
            },
            Event::Grant {
                account: self.consumer,
                amount_micro: micro(1_000_000),
                memo: "welcome".into(),
                at_ms: AT_MS,
            },
        ];
        for j in &self.jobs {
            events.push(self.placed(j));
        }
        events.push(Event::AccountOpened {
            account: AccountId::derive(b"conformance other"),
            role: AccountRole::Consumer,
            at_ms: AT_MS,
        });
        events
    }

    fn placed(&self, j: &Job) -> Event {
        Event::HoldPlaced {
            hold: j.hold,
            job: j.job,
            account: j.consumer,
            model: "m".into(),
            amount_micro: j.reserved,
            expires_at_ms: AT_MS + 60_000,
            schedule_version: 1,
            at_ms: AT_MS,
            origin: Some("node-a".into()),
        }
    }

    /// The first job settled for 1,000 in and 100 out, the second voided.
    fn closing(&self) -> Vec<Event> {
        vec![
            settlement(
                &self.jobs[0],
                (1_000, 100),
                &self.schedule,
                (&self.worker_key, &self.coordinator),
                AT_MS + 1,
            ),
            Event::HoldVoided {
                hold: self.jobs[1].hold,
                reason: VoidReason::Failed,
                at_ms: AT_MS + 1,
            },
        ]
    }
}

/// `events` as the owner of `partition` wrote them, from record `first`.
fn sourced(partition: i32, first: i64, events: &[Event]) -> Vec<Sourced> {
    events
        .iter()
        .zip(first..)
        .map(|(e, offset)| Sourced {
            partition,
            offset,
            entry: encode_entry(e).expect("encodes"),
        })
        .collect()
}

fn checked(batch: &[Sourced]) -> Checked {
    Checked::check(batch.to_vec()).expect("every signature checks")
}

fn to(pairs: &[(i32, i64)]) -> BTreeMap<i32, i64> {
    pairs.iter().copied().collect()
}

fn key_issued(n: u8, account: AccountId) -> Directory {
    Directory::Key(KeyEvent::Issued {
        key: ApiKeyId([n; 16]),
        account,
        hash: hex::encode([n; 32]),
        at_ms: AT_MS,
    })
}

/// A batch's leaves, balances, holds, receipts, registrations, network
/// leaves, directory and positions read back as the sequencer decided them.
pub async fn sequences_and_reads_back(f: &impl Fixture) {
    let store = f.handle(0);
    let net = Net::new();
    let mut sequencer = Sequencer::open(&store, PARTITIONS).await.expect("open");
    assert_eq!(sequencer.tree_size(), 0);
    assert_eq!(store.tree_size().await.expect("size"), 0);
    assert!(store.positions().await.expect("positions").is_empty());

    let opening = sourced(0, 0, &net.opening());
    let banned = WorkerId::derive(b"banned");
    let directory = vec![
        key_issued(1, net.consumer),
        key_issued(2, net.consumer),
        Directory::Key(KeyEvent::Revoked {
            key: ApiKeyId([2; 16]),
            at_ms: AT_MS,
        }),
        Directory::Ban(BanEvent::Banned {
            worker: banned,
            at_ms: AT_MS,
        }),
    ];
    // Partition 1 was read past records that are not leaves.
    let read = to(&[(0, 9), (1, 7)]);
    let applied = sequencer
        .apply(
            &store,
            None,
            checked(&opening).with_directory(directory),
            &read,
        )
        .await
        .expect("apply");
    assert_eq!(
        applied,
        Applied {
            sequenced: 9,
            skipped: 0,
            tree_size: 9,
            entries: opening.iter().map(|s| s.entry.clone()).collect(),
        }
    );
    assert_eq!(store.tree_size().await.expect("size"), 9);
    assert_eq!(store.positions().await.expect("positions"), read);
    let leaves = store.leaves(0, 100).await.expect("leaves");
    assert_eq!(
        leaves,
        opening
            .iter()
            .cloned()
            .zip(0..)
            .map(|(s, i)| (i, s))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        store.leaves(3, 5).await.expect("leaves"),
        leaves[3..5].to_vec()
    );
    assert!(store.leaves(9, 20).await.expect("past the end").is_empty());
    assert_eq!(
        store.account(&net.consumer).await.expect("read"),
        Some(AccountRow {
            account: net.consumer,
            partition: partition_of(&net.consumer, PARTITIONS),
            state: Account {
                role: Some(AccountRole::Consumer),
                debits_posted: 0,
                credits_posted: 1_000_000,
                debits_pending: 500_000,
            },
        })
    );
    let treasury = store
        .account(&AccountId::TREASURY)
        .await
        .expect("read")
        .expect("the grant debits the treasury");
    assert_eq!(
        (treasury.state.debits_posted, treasury.state.credits_posted),
        (1_000_000, 0)
    );
    let [first, second] = net.jobs;
    for j in [first, second] {
        assert_eq!(
            store.hold(&j.hold).await.expect("read"),
            Some(Hold {
                account: net.consumer,
                job: j.job,
                model: "m".into(),
                amount: j.reserved,
                expires_at_ms: AT_MS + 60_000,
                schedule_version: 1,
                origin: Some("node-a".into()),
            })
        );
    }
    assert_eq!(
        store.registration(&net.worker).await.expect("read"),
        Some(Worker {
            key: public_key(&net.worker_key),
            account: net.worker_account,
        })
    );
    assert_eq!(
        store
            .registration(&WorkerId::derive(b"nobody"))
            .await
            .expect("read"),
        None
    );
    assert_eq!(store.network_leaves().await.expect("read"), [0, 1]);
    let key = |n: u8, revoked| KeyRow {
        key: ApiKeyId([n; 16]),
        account: net.consumer,
        hash: [n; 32],
        revoked,
    };
    assert_eq!(
        store.directory().await.expect("read"),
        (vec![key(1, false), key(2, true)], vec![banned])
    );

    // The first hold settled, the second voided.
    let closing = sourced(0, 9, &net.closing());
    let applied = sequencer
        .apply(&store, None, checked(&closing), &to(&[(0, 11)]))
        .await
        .expect("apply");
    assert_eq!((applied.sequenced, applied.tree_size), (2, 11));
    let charge = net
        .schedule
        .charge("m", 1_000, 100, first.reserved)
        .expect("priced");
    assert_eq!(
        charge.charged, 1_300,
        "1,000 in at 1,000 and 100 out at 3,000 per 1k"
    );
    assert_eq!(
        store.receipt(&first.job).await.expect("read"),
        Some(ReceiptRow {
            job: first.job,
            leaf: 9,
            consumer: net.consumer,
            worker: net.worker,
            charged_micro: charge.charged,
            worker_earned_micro: charge.earned,
            fee_micro: charge.fee,
        })
    );
    assert_eq!(store.receipt(&second.job).await.expect("read"), None);
    for j in [first, second] {
        assert_eq!(store.hold(&j.hold).await.expect("read"), None, "closed");
    }
    let consumer = store
        .account(&net.consumer)
        .await
        .expect("read")
        .expect("open");
    assert_eq!(
        (
            consumer.state.debits_posted,
            consumer.state.credits_posted,
            consumer.state.debits_pending
        ),
        (u128::from(charge.charged), 1_000_000, 0)
    );
    let worker = store
        .account(&net.worker_account)
        .await
        .expect("read")
        .expect("open");
    assert_eq!(worker.state.credits_posted, u128::from(charge.earned));
    let treasury = store
        .account(&AccountId::TREASURY)
        .await
        .expect("read")
        .expect("open");
    assert_eq!(treasury.state.credits_posted, u128::from(charge.fee));
    assert_eq!(
        store.positions().await.expect("positions"),
        to(&[(0, 11), (1, 7)]),
        "a partition not read this batch keeps its position"
    );
}

/// A record already sequenced, or twice in one batch, is skipped; positions
/// never move back.
pub async fn skips_redeliveries(f: &impl Fixture) {
    let store = f.handle(0);
    let net = Net::new();
    let mut sequencer = Sequencer::open(&store, PARTITIONS).await.expect("open");
    let opening = sourced(0, 0, &net.opening());
    sequencer
        .apply(&store, None, checked(&opening), &to(&[(0, 9)]))
        .await
        .expect("apply");
    let ids: Vec<(i32, i64)> = [(0, 3), (0, 8), (0, 9), (1, 0)].to_vec();
    assert_eq!(
        store
            .sequenced_among(&ids)
            .await
            .expect("read")
            .into_iter()
            .collect::<Vec<_>>(),
        [(0, 3), (0, 8)]
    );
    // The whole batch again, the first closing record twice, and from an
    // older read position.
    let closing = sourced(0, 9, &net.closing());
    let mut again = opening.clone();
    again.extend([closing[0].clone(), closing[0].clone()]);
    let applied = sequencer
        .apply(&store, None, checked(&again), &to(&[(0, 5)]))
        .await
        .expect("apply");
    assert_eq!(
        (applied.sequenced, applied.skipped, applied.tree_size),
        (1, 10, 10)
    );
    assert_eq!(applied.entries, [closing[0].entry.clone()]);
    assert_eq!(store.tree_size().await.expect("size"), 10);
    assert_eq!(store.positions().await.expect("positions"), to(&[(0, 9)]));
    assert_eq!(
        store
            .receipt(&net.jobs[0].job)
            .await
            .expect("read")
            .map(|r| r.leaf),
        Some(9)
    );
    // Only redeliveries: nothing sequenced, the position still moves.
    let applied = sequencer
        .apply(&store, None, checked(&again), &to(&[(0, 12)]))
        .await
        .expect("apply");
    assert_eq!((applied.sequenced, applied.tree_size), (0, 10));
    assert_eq!(store.positions().await.expect("positions"), to(&[(0, 12)]));
}

/// Of two sequencers opened at the same size, the second to commit is
/// fenced, and stores nothing.
pub async fn fences_a_stale_sequencer(f: &impl Fixture) {
    let (live_store, stale_store) = (f.handle(0), f.handle(1));
    let net = Net::new();
    let mut stale = Sequencer::open(&stale_store, PARTITIONS)
        .await
        .expect("open");
    let mut live = Sequencer::open(&live_store, PARTITIONS)
        .await
        .expect("open");
    let opening = sourced(0, 0, &net.opening());
    live.apply(&live_store, None, checked(&opening), &to(&[(0, 9)]))
        .await
        .expect("apply");
    let other = sourced(1, 0, &[prices(AT_MS)]);
    let fenced = stale
        .apply(&stale_store, None, checked(&other), &to(&[(1, 1)]))
        .await;
    assert!(
        matches!(
            fenced,
            Err(ProjectionError::Fenced {
                expected: 0,
                found: 9
            })
        ),
        "{fenced:?}"
    );
    assert_eq!(stale_store.tree_size().await.expect("size"), 9);
    assert_eq!(
        stale_store.positions().await.expect("positions"),
        to(&[(0, 9)])
    );
    assert_eq!(
        stale_store.leaves(0, 100).await.expect("leaves").len(),
        9,
        "the fenced batch left no leaf"
    );
    // The live one goes on.
    let closing = sourced(0, 9, &net.closing());
    live.apply(&live_store, None, checked(&closing), &to(&[(0, 11)]))
        .await
        .expect("apply");
    assert_eq!(stale_store.tree_size().await.expect("size"), 11);
}

/// A commit whose `before` fails, or a batch the fold refuses, stores
/// nothing; the sequencer stops until reopened, and reopens where the store
/// is.
pub async fn a_failed_batch_stores_nothing(f: &impl Fixture) {
    let store = f.handle(0);
    let net = Net::new();
    let opening = sourced(0, 0, &net.opening());
    let commit = Commit {
        tree_size: 0,
        leaves: opening.clone(),
        accounts: vec![AccountRow {
            account: net.consumer,
            partition: 0,
            state: Account {
                role: Some(AccountRole::Consumer),
                credits_posted: 1,
                ..Account::default()
            },
        }],
        read_to: to(&[(0, 9)]),
        snapshot: Some(b"{}".to_vec()),
        ..Commit::default()
    };
    let failed = store
        .commit(&commit, async { Err(ProjectionError::Poisoned) })
        .await;
    assert!(
        matches!(failed, Err(ProjectionError::Poisoned)),
        "{failed:?}"
    );
    assert_eq!(store.tree_size().await.expect("size"), 0);
    assert!(store.positions().await.expect("positions").is_empty());
    assert!(store.leaves(0, 100).await.expect("leaves").is_empty());
    assert_eq!(store.account(&net.consumer).await.expect("read"), None);
    assert!(store.snapshots(100).await.expect("read").is_empty());

    let mut sequencer = Sequencer::open(&store, PARTITIONS).await.expect("open");
    sequencer
        .apply(&store, None, checked(&opening), &to(&[(0, 9)]))
        .await
        .expect("apply");
    let before = sequencer.ledger().clone();
    // A hold the consumer cannot cover: the fold refuses it.
    let overdraw = Job {
        hold: HoldId::derive(b"overdraw"),
        job: JobId::derive(b"overdraw"),
        consumer: net.consumer,
        reserved: micro(900_000),
    };
    let batch = sourced(0, 9, &[net.placed(&overdraw)]);
    let refused = sequencer
        .apply(&store, None, checked(&batch), &to(&[(0, 10)]))
        .await;
    assert!(
        matches!(refused, Err(ProjectionError::Refused(_))),
        "{refused:?}"
    );
    assert!(matches!(
        sequencer
            .apply(&store, None, checked(&batch), &to(&[(0, 10)]))
            .await,
        Err(ProjectionError::Poisoned)
    ));
    assert_eq!(store.tree_size().await.expect("size"), 9);
    assert_eq!(store.positions().await.expect("positions"), to(&[(0, 9)]));
    assert_eq!(store.hold(&overdraw.hold).await.expect("read"), None);
    let reopened = Sequencer::open(&store, PARTITIONS).await.expect("reopen");
    assert_eq!(reopened.tree_size(), 9);
    assert_eq!(reopened.ledger(), &before, "the fold of what was stored");
}

/// A reopened sequencer has the same fold, from the newest snapshot (the
/// newest two are kept, each at the end of the batch that crossed its
/// interval) or from the leaves.
pub async fn reopens_from_the_newest_snapshot(f: &impl Fixture) {
    let store = f.handle(0);
    let mut sequencer = Sequencer::open(&store, PARTITIONS)
        .await
        .expect("open")
        .snapshot_every(4);
    let mut events = vec![prices(AT_MS)];
    for n in 0..20u8 {
        events.push(Event::AccountOpened {
            account: AccountId::derive(&[b'a', n]),
            role: AccountRole::Consumer,
            at_ms: AT_MS,
        });
    }
    let all = sourced(2, 0, &events);
    for batch in all.chunks(3) {
        let next = batch.last().expect("not empty").offset + 1;
        sequencer
            .apply(&store, None, checked(batch), &to(&[(2, next)]))
            .await
            .expect("apply");
    }
    assert_eq!(sequencer.tree_size(), 21);
    let sizes =
        |snapshots: Vec<(u64, Vec<u8>)>| snapshots.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    assert_eq!(sizes(store.snapshots(21).await.expect("read")), [21, 18]);
    assert_eq!(sizes(store.snapshots(20).await.expect("read")), [18]);
    assert!(store.snapshots(17).await.expect("read").is_empty());
    let reopened = Sequencer::open(&store, PARTITIONS).await.expect("reopen");
    assert_eq!(reopened.tree_size(), 21);
    assert_eq!(reopened.ledger(), sequencer.ledger());
}

/// Declares the whole suite as tests for one adapter: `$fresh` is an async
/// function returning a new, empty [`Fixture`].
#[macro_export]
macro_rules! projection_store_conformance {
    ($fresh:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn projection_conformance_sequences_and_reads_back() {
            let f = $fresh().await;
            $crate::cluster::projection_store::conformance::sequences_and_reads_back(&f).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn projection_conformance_skips_redeliveries() {
            let f = $fresh().await;
            $crate::cluster::projection_store::conformance::skips_redeliveries(&f).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn projection_conformance_fences_a_stale_sequencer() {
            let f = $fresh().await;
            $crate::cluster::projection_store::conformance::fences_a_stale_sequencer(&f).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn projection_conformance_a_failed_batch_stores_nothing() {
            let f = $fresh().await;
            $crate::cluster::projection_store::conformance::a_failed_batch_stores_nothing(&f).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn projection_conformance_reopens_from_the_newest_snapshot() {
            let f = $fresh().await;
            $crate::cluster::projection_store::conformance::reopens_from_the_newest_snapshot(&f)
                .await;
        }
    };
}
