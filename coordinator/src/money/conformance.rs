//! One suite every [`Money`] adapter must pass: what the account actors and
//! the request handlers rely on, whoever judges. Each test opens its own
//! `account` (an id not used before) and funds it from the treasury; a
//! cluster runs each with an account of a partition owned by the node asked
//! and one owned by another node.

use futures_util::future::join_all;
use troop_schemas::event::{AccountRole, VoidReason};
use troop_schemas::{AccountId, CreditsMicro, Event, HoldId, JobId};

use super::{Home, Money, MoneyError, Refusal, Verdict};

/// What the suite runs against.
#[derive(Debug, Clone, Copy)]
pub struct Fixture<'a> {
    pub money: &'a dyn Money,
    /// A model priced by schedule `schedule_version`, which every judge has.
    pub model: &'a str,
    pub schedule_version: u64,
    /// The events' clock.
    pub at_ms: u64,
}

fn micro(n: u64) -> CreditsMicro {
    CreditsMicro::new(n).expect("a small amount")
}

/// The suite's own moves, also used by the reads suite
/// ([`crate::reads::conformance`]).
impl Fixture<'_> {
    pub async fn change(&self, account: AccountId, events: Vec<Event>) -> Vec<Verdict> {
        self.money
            .change(Home::Account(account), events)
            .await
            .expect("judged")
            .durable()
            .await
            .expect("durable")
    }

    pub async fn open(&self, account: AccountId, credits_micro: u64) {
        let verdicts = self
            .change(
                account,
                vec![
                    Event::AccountOpened {
                        account,
                        role: AccountRole::Consumer,
                        at_ms: self.at_ms,
                    },
                    Event::Grant {
                        account,
                        amount_micro: micro(credits_micro),
                        memo: "conformance".into(),
                        at_ms: self.at_ms,
                    },
                ],
            )
            .await;
        for v in verdicts {
            v.expect("a new account opens and is funded");
        }
    }

    pub fn hold(&self, account: AccountId, n: u32, amount_micro: u64) -> Event {
        let id = format!("{account}-{n}");
        Event::HoldPlaced {
            hold: HoldId::derive(id.as_bytes()),
            job: JobId::derive(id.as_bytes()),
            account,
            model: self.model.into(),
            amount_micro: micro(amount_micro),
            expires_at_ms: self.at_ms + 60_000,
            schedule_version: self.schedule_version,
            at_ms: self.at_ms,
            origin: None,
        }
    }
}

fn hold_id(event: &Event) -> HoldId {
    match event {
        Event::HoldPlaced { hold, .. } => *hold,
        _ => unreachable!("built as a hold"),
    }
}

/// 30 holds of 50,000 against 1,000,000, all at once: exactly 20 fit, and
/// each refused one says by how much it fell short.
pub async fn concurrent_holds_never_overdraw(f: Fixture<'_>, account: AccountId) {
    f.open(account, 1_000_000).await;
    let verdicts = join_all((0..30).map(|n| {
        let hold = f.hold(account, n, 50_000);
        async move { f.change(account, vec![hold]).await.remove(0) }
    }))
    .await;
    let accepted = verdicts.iter().filter(|v| v.is_ok()).count();
    assert_eq!(accepted, 20, "{verdicts:?}");
    for v in verdicts.iter().filter_map(|v| v.as_ref().err()) {
        assert_eq!(v.code, Refusal::INSUFFICIENT_FUNDS, "{v:?}");
        let shortfall = v.shortfall.expect("a shortfall names its numbers");
        assert_eq!(shortfall.needed_micro, 50_000);
        assert!(shortfall.available_micro < 50_000, "{shortfall:?}");
    }
}

/// A hold is voided or expired once; the second outcome is refused, and an
/// expiry before the deadline too.
pub async fn a_hold_resolves_once(f: Fixture<'_>, account: AccountId) {
    f.open(account, 1_000).await;
    let (first, second) = (f.hold(account, 1, 600), f.hold(account, 2, 400));
    let (a, b) = (hold_id(&first), hold_id(&second));
    for v in f.change(account, vec![first, second]).await {
        v.expect("both fit");
    }
    let void = |hold| Event::HoldVoided {
        hold,
        reason: VoidReason::Failed,
        at_ms: f.at_ms + 1,
    };
    f.change(account, vec![void(a)]).await[0]
        .as_ref()
        .expect("voided");
    let again = f.change(account, vec![void(a)]).await.remove(0);
    assert_eq!(again.expect_err("twice").code, Refusal::HOLD_NOT_OPEN);
    let expire = |at_ms| Event::HoldExpired { hold: b, at_ms };
    let early = f.change(account, vec![expire(f.at_ms + 59_999)]).await;
    assert_eq!(early[0].as_ref().expect_err("early").code, Refusal::REFUSED);
    f.change(account, vec![expire(f.at_ms + 60_000)]).await[0]
        .as_ref()
        .expect("expired at its deadline");
    // Both released: the whole balance is spendable again.
    f.change(account, vec![f.hold(account, 3, 1_000)]).await[0]
        .as_ref()
        .expect("everything released");
    // Placed again (a resend after a try whose outcome was unknown): the
    // caller learns an earlier try placed it.
    let again = f
        .change(account, vec![f.hold(account, 3, 1_000)])
        .await
        .remove(0);
    assert_eq!(
        again.expect_err("placed twice").code,
        Refusal::ALREADY_EXISTS
    );
}

/// A change's events are judged in order, each on its own: a refused one
/// changes nothing and does not stop the ones after it.
pub async fn each_event_gets_its_own_verdict(f: Fixture<'_>, account: AccountId) {
    f.open(account, 1_000).await;
    let mut unpriced = f.hold(account, 1, 10);
    if let Event::HoldPlaced { model, .. } = &mut unpriced {
        *model = "no such model".into();
    }
    let verdicts = f
        .change(
            account,
            vec![
                f.hold(account, 2, 700),
                f.hold(account, 3, 700),
                unpriced,
                f.hold(account, 4, 300),
            ],
        )
        .await;
    assert_eq!(verdicts.len(), 4);
    let first = *verdicts[0].as_ref().expect("fits");
    assert_eq!(
        verdicts[1]
            .as_ref()
            .expect_err("does not fit next to the first")
            .code,
        Refusal::INSUFFICIENT_FUNDS
    );
    assert_eq!(
        verdicts[2].as_ref().expect_err("unpriced").code,
        Refusal::UNKNOWN_MODEL
    );
    let last = *verdicts[3].as_ref().expect("fits what is left");
    assert!(last > first, "recorded in order: {first} then {last}");
    let unknown = AccountId::derive(format!("{account}-never-opened").as_bytes());
    let v = f
        .money
        .change(Home::Account(unknown), vec![f.hold(unknown, 1, 1)])
        .await
        .expect("judged")
        .durable()
        .await
        .expect("nothing to record");
    assert_eq!(
        v[0].as_ref().expect_err("no such account").code,
        Refusal::UNKNOWN_ACCOUNT
    );
}

/// A single-event commit returns the refusal itself.
pub async fn a_single_commit_returns_its_refusal(f: Fixture<'_>, account: AccountId) {
    f.open(account, 100).await;
    let e = super::commit_one(f.money, Home::Account(account), f.hold(account, 1, 101))
        .await
        .expect_err("too much");
    assert!(
        matches!(&e, MoneyError::Refused(r) if r.code == Refusal::INSUFFICIENT_FUNDS),
        "{e:?}"
    );
    super::commit_one(f.money, Home::Account(account), f.hold(account, 2, 100))
        .await
        .expect("all of it");
}

/// Every test of the suite, each with its own new account: `account(test)`.
pub async fn run_all(f: Fixture<'_>, account: &dyn Fn(&str) -> AccountId) {
    concurrent_holds_never_overdraw(f, account("overdraw")).await;
    a_hold_resolves_once(f, account("resolves")).await;
    each_event_gets_its_own_verdict(f, account("verdicts")).await;
    a_single_commit_returns_its_refusal(f, account("single")).await;
}
