//! One suite every [`Reads`] adapter must pass: what the API answers about an
//! account, a worker, a receipt and the ledger after changes made through the
//! [`crate::money::Money`] port. A cluster node reads what the sequencer has
//! projected, so each check waits (bounded) until the read shows the change;
//! the embedded books show it at once.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use troop_ledger::fold::{Account, Hold, Schedule, Worker};
use troop_ledger::note::{Checkpoint, NoteVerifier};
use troop_ledger::proof::TlogProof;
use troop_ledger::receipt::{countersign, public_key, sign_receipt};
use troop_schemas::event::{AccountRole, VoidReason};
use troop_schemas::{AccountId, CreditsMicro, Digest, Event, HoldId, JobId, Receipt, WorkerId};

use super::{AccountView, MAX_LIST_ACCOUNTS, Reads};

/// What the suite runs against.
#[derive(Debug, Clone, Copy)]
pub struct Fixture<'a> {
    /// Where the suite makes its changes, with the model, schedule version
    /// and clock the money suite uses.
    pub books: crate::money::conformance::Fixture<'a>,
    pub reads: &'a dyn Reads,
    /// The schedule at `books.schedule_version`: settlements are charged at it.
    pub schedule: &'a Schedule,
    /// A coordinator key the books accept countersignatures from.
    pub coordinator: &'a SigningKey,
    /// The ledger's checkpoint key.
    pub verifier: &'a NoteVerifier,
}

/// How long a read may take to show a change: a cluster's sequencer
/// projects and publishes within about a second when the machine is idle;
/// a loaded CI machine gets room.
const SHOWN_WITHIN: Duration = Duration::from_secs(60);

/// Reads with `read` until `shown` holds of the answer; panics after
/// [`SHOWN_WITHIN`] with the last answer.
pub(crate) async fn eventually<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    read: impl Fn() -> F,
    shown: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + SHOWN_WITHIN;
    loop {
        let answer = read().await;
        if shown(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not shown within {SHOWN_WITHIN:?}; last read {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn micro(n: u64) -> CreditsMicro {
    CreditsMicro::new(n).expect("a small amount")
}

fn hold_of(event: &Event) -> (HoldId, Hold) {
    Hold::placed(event).expect("built as a hold")
}

/// A worker with a key of its own, registered with its earnings account.
async fn register_worker(f: Fixture<'_>, name: &str) -> (SigningKey, Worker) {
    let key = SigningKey::from_bytes(blake3::hash(name.as_bytes()).as_bytes());
    let worker_key = public_key(&key);
    let account = AccountId::derive(&worker_key.0);
    let worker = crate::money::register_worker(f.books.money, worker_key, f.books.at_ms)
        .await
        .expect("the worker registers");
    assert_eq!(worker, WorkerId::from_key(&worker_key));
    let again = crate::money::register_worker(f.books.money, worker_key, f.books.at_ms + 1)
        .await
        .expect("registering again is done");
    assert_eq!(again, worker);
    (
        key,
        Worker {
            key: worker_key,
            account,
        },
    )
}

/// An account reads with its balance and its open holds (with the schedule
/// each was priced at) once judged; a resolved hold is gone; an account
/// never opened reads as none.
pub async fn an_account_reads_as_judged(f: Fixture<'_>, account: AccountId) {
    f.books.open(account, 1_000_000).await;
    let (kept, voided) = (
        f.books.hold(account, 1, 300_000),
        f.books.hold(account, 2, 200_000),
    );
    let void = Event::HoldVoided {
        hold: hold_of(&voided).0,
        reason: VoidReason::Failed,
        at_ms: f.books.at_ms + 1,
    };
    for v in f
        .books
        .change(account, vec![kept.clone(), voided, void])
        .await
    {
        v.expect("judged");
    }
    let expected = AccountView {
        account: Account {
            role: Some(AccountRole::Consumer),
            debits_posted: 0,
            credits_posted: 1_000_000,
            debits_pending: 300_000,
        },
        holds: vec![hold_of(&kept)],
    };
    eventually(
        "the account after two holds and a void",
        || f.reads.account(account),
        |read| read.as_ref().is_ok_and(|v| v.as_ref() == Some(&expected)),
    )
    .await
    .expect("read");
    let never = AccountId::derive(format!("{account}-never-opened").as_bytes());
    assert_eq!(f.reads.account(never).await, Ok(None));
}

/// A registered worker reads with its key and earnings account; one never
/// registered reads as none.
pub async fn a_worker_reads_once_registered(f: Fixture<'_>, name: &str) {
    let (_, registered) = register_worker(f, name).await;
    let id = WorkerId::from_key(&registered.key);
    eventually(
        "the registered worker",
        || f.reads.worker(id),
        |read| read.as_ref().is_ok_and(|w| w.as_ref() == Some(&registered)),
    )
    .await
    .expect("read");
    let stranger = WorkerId::from_key(&public_key(&SigningKey::from_bytes(&[7; 32])));
    assert_eq!(f.reads.worker(stranger).await, Ok(None));
}

/// A settled job's receipt reads as the ledger's `hold_settled` entry with an
/// inclusion proof that verifies against a checkpoint signed by the ledger's
/// key, which `/ledger/checkpoint` also serves; the earnings read on the
/// worker's account; a job never settled reads as none.
pub async fn a_receipt_reads_with_a_proof(f: Fixture<'_>, account: AccountId, name: &str) {
    f.books.open(account, 1_000_000).await;
    let (worker_key, worker) = register_worker(f, name).await;
    let placed = f.books.hold(account, 1, 100_000);
    let (hold, held) = hold_of(&placed);
    let (input, output) = (40, 60);
    let body = Receipt {
        job: held.job,
        hold,
        consumer: account,
        worker: WorkerId::from_key(&worker.key),
        worker_key: worker.key,
        model: held.model.clone(),
        input_tokens: input,
        output_tokens: output,
        request_digest: Digest::of(name.as_bytes()),
        response_digest: Digest::of(account.to_string().as_bytes()),
        started_at_ms: f.books.at_ms,
        finished_at_ms: f.books.at_ms + 10,
    };
    let signature = sign_receipt(&worker_key, &body).expect("signs");
    let receipt = countersign(f.coordinator, body, signature, input, output).expect("signs");
    let charge = f
        .schedule
        .charge(&held.model, input, output, held.amount)
        .expect("the fixture's model is priced");
    let settled = Event::HoldSettled {
        hold,
        receipt,
        charged_micro: micro(charge.charged),
        worker_earned_micro: micro(charge.earned),
        fee_micro: micro(charge.fee),
        at_ms: f.books.at_ms + 10,
    };
    for v in f.books.change(account, vec![placed, settled.clone()]).await {
        v.expect("placed and settled");
    }
    let logged = eventually(
        "the settled receipt",
        || f.reads.receipt(held.job),
        |read| matches!(read, Ok(Some(_))),
    )
    .await
    .expect("read")
    .expect("shown");
    assert_eq!(
        troop_schemas::decode_entry(&logged.entry).expect("an entry"),
        settled
    );
    let proof = TlogProof::parse(&logged.tlog_proof).expect("tlog-proof text");
    let checkpoint = proof
        .verify(&logged.entry, f.verifier)
        .expect("the proof verifies against a signed checkpoint");
    assert!(logged.index < checkpoint.size);
    let served = f
        .reads
        .ledger_file(troop_ledger::store::CHECKPOINT_PATH.into())
        .await
        .expect("read")
        .expect("a checkpoint is published");
    let served = Checkpoint::open(std::str::from_utf8(&served).expect("text"), f.verifier)
        .expect("the served checkpoint is signed by the ledger's key");
    assert!(
        served.size >= checkpoint.size,
        "checkpoints only move forward"
    );
    eventually(
        "the worker's earnings",
        || f.reads.account(worker.account),
        |read| {
            read.as_ref().is_ok_and(|v| {
                v.as_ref()
                    .is_some_and(|v| v.account.credits_posted == u128::from(charge.earned))
            })
        },
    )
    .await
    .expect("read");
    let never = JobId::derive(format!("{name}-never-settled").as_bytes());
    assert_eq!(f.reads.receipt(never).await, Ok(None));
}

/// Accounts list in id order, a page at a time: pages of one, each after the
/// last, walk the same accounts as one page of all.
pub async fn accounts_list_in_pages(f: Fixture<'_>, accounts: [AccountId; 3]) {
    for a in accounts {
        f.books.open(a, 1).await;
    }
    let all = eventually(
        "the new accounts in the listing",
        || f.reads.accounts(None, MAX_LIST_ACCOUNTS),
        |read| {
            read.as_ref()
                .is_ok_and(|l| accounts.iter().all(|a| l.iter().any(|(id, _)| id == a)))
        },
    )
    .await
    .expect("listed");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "in id order");
    assert!(
        all.len() < MAX_LIST_ACCOUNTS,
        "the suite's few accounts fit one page"
    );
    let mut walked = Vec::new();
    let mut after = None;
    while walked.len() < all.len() {
        let page = f.reads.accounts(after, 1).await.expect("a page");
        assert_eq!(page.len(), 1, "one a page until the end");
        after = Some(page[0].0);
        walked.extend(page.into_iter().map(|(id, _)| id));
    }
    let ids: Vec<_> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(walked, ids);
}

/// The network's facts read as the ledger has them: the schedule the suite
/// prices at (or a newer one), and a key that countersigns receipts.
pub async fn the_network_reads_as_published(f: Fixture<'_>) {
    let network = eventually(
        "the network's schedule and keys",
        || f.reads.network(),
        |n| {
            n.as_ref().is_ok_and(|n| {
                n.coordinator_key.is_some()
                    && n.schedule
                        .as_ref()
                        .is_some_and(|s| s.version >= f.schedule.version)
            })
        },
    )
    .await
    .expect("read");
    let schedule = network.schedule.expect("shown");
    if schedule.version == f.schedule.version {
        assert_eq!(&schedule, f.schedule);
    }
}

/// Every test of the suite: `account(test)` is a new account for each.
pub async fn run_all(f: Fixture<'_>, account: &dyn Fn(&str) -> AccountId) {
    the_network_reads_as_published(f).await;
    an_account_reads_as_judged(f, account("reads-account")).await;
    a_worker_reads_once_registered(f, &format!("{}", account("reads-worker"))).await;
    a_receipt_reads_with_a_proof(
        f,
        account("reads-receipt"),
        &format!("{}", account("reads-receipt-worker")),
    )
    .await;
    accounts_list_in_pages(
        f,
        [
            account("reads-list-1"),
            account("reads-list-2"),
            account("reads-list-3"),
        ],
    )
    .await;
}
