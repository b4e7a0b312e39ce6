//! One actor per active account: its request allowance (rate and in-flight
//! limits), and the one door through which its balance changes reach the
//! books, in order.
//!
//! The books judge every event again (no overdraft, holds resolve once), so an
//! account actor cannot break an invariant; what it adds is that an account's
//! requests never contend on a lock shared with other accounts, and a place
//! where per-account serialization lives when the books are shared by nodes.
//! Idle accounts' actors retire: memory follows the accounts in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use troop_schemas::{AccountId, Event};

use crate::domain::ratelimit::{Allowance, RateLimits, Refusal};
use crate::money::{Home, Judged, Money, MoneyError};

#[derive(Debug)]
pub struct AccountActor {
    account: AccountId,
    limits: RateLimits,
    allowance: Allowance,
    money: Arc<dyn Money>,
    directory: Accounts,
}

impl Actor for AccountActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.directory.idle_check, |act, ctx| {
            if act.allowance.is_idle(&act.limits, crate::server::now_ms()) {
                // A fresh actor would start exactly where this one is.
                act.directory.retire(act.account, &ctx.address());
                ctx.stop();
            }
        });
    }
}

/// Takes a place for one request, or says why not (429).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), Refusal>")]
struct Admit {
    now_ms: u64,
}

impl Handler<Admit> for AccountActor {
    type Result = Result<(), Refusal>;
    fn handle(&mut self, msg: Admit, _: &mut Self::Context) -> Self::Result {
        self.allowance.acquire(&self.limits, msg.now_ms)
    }
}

/// A request of this account ended; sent by [`Admission`]'s drop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Leave;

impl Handler<Leave> for AccountActor {
    type Result = ();
    fn handle(&mut self, _: Leave, _: &mut Self::Context) {
        self.allowance.release();
    }
}

/// Balance changes of this account (a hold, its settlement or voiding, a
/// grant), handed to the books ([`Money`]) in the order this actor takes
/// them; the books judge and queue them, and the caller awaits durability
/// outside both. The actor does not wait for a verdict before the next
/// change: one busy account must not stall on a round trip per change.
#[derive(Debug, Message)]
#[rtype(result = "Result<Judged, MoneyError>")]
struct Change(Vec<Event>);

impl Handler<Change> for AccountActor {
    type Result = ResponseFuture<Result<Judged, MoneyError>>;
    fn handle(&mut self, msg: Change, _: &mut Self::Context) -> Self::Result {
        for event in &msg.0 {
            if let Event::HoldPlaced { account, .. } | Event::Grant { account, .. } = event {
                assert_eq!(*account, self.account, "a change sent to another account");
            }
        }
        // Handed over here, in this actor's order.
        self.money.change(Home::Account(self.account), msg.0)
    }
}

/// One request's place in its account's in-flight count; given back on drop,
/// however the request ends (answered, failed, or the client went away).
#[derive(Debug)]
pub struct Admission {
    actor: Addr<AccountActor>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        // To the actor that admitted it: a retired actor had nothing in flight.
        self.actor.do_send(Leave);
    }
}

/// Finds or starts an account's actor.
#[derive(Debug, Clone)]
pub struct Accounts {
    actors: Arc<Mutex<HashMap<AccountId, Addr<AccountActor>>>>,
    money: Arc<dyn Money>,
    limits: RateLimits,
    /// How often an actor checks whether it is idle and can retire.
    idle_check: Duration,
}

impl Accounts {
    pub fn new(money: Arc<dyn Money>, limits: RateLimits, idle_check: Duration) -> Self {
        Self {
            actors: Arc::default(),
            money,
            limits,
            idle_check: idle_check.max(Duration::from_millis(10)),
        }
    }

    /// The account's actor, started on the calling thread's arbiter if it has
    /// none. Must be called inside an actix system.
    fn actor(&self, account: AccountId) -> Addr<AccountActor> {
        let mut actors = self.actors.lock().expect("accounts lock");
        if let Some(addr) = actors.get(&account).filter(|a| a.connected()) {
            return addr.clone();
        }
        let addr = AccountActor {
            account,
            limits: self.limits,
            allowance: Allowance::new(&self.limits, crate::server::now_ms()),
            money: Arc::clone(&self.money),
            directory: self.clone(),
        }
        .start();
        actors.insert(account, addr.clone());
        addr
    }

    fn retire(&self, account: AccountId, addr: &Addr<AccountActor>) {
        let mut actors = self.actors.lock().expect("accounts lock");
        if actors.get(&account) == Some(addr) {
            actors.remove(&account);
        }
    }

    /// Accounts with an actor now.
    pub fn active(&self) -> usize {
        self.actors.lock().expect("accounts lock").len()
    }

    /// Admits one request of `account` (rate and in-flight limits); once more
    /// to a fresh actor if that one retired between the lookup and the send.
    pub async fn admit(&self, account: AccountId, now_ms: u64) -> Result<Admission, Refusal> {
        for _ in 0..2 {
            let actor = self.actor(account);
            if let Ok(verdict) = actor.send(Admit { now_ms }).await {
                verdict?;
                return Ok(Admission { actor });
            }
        }
        // Two actors gone in a row: only a stopping system; ask to come back.
        Err(Refusal::Rate {
            retry_after_ms: 1_000,
        })
    }

    /// Judges and queues `events`, changes of `account`'s balance, in the
    /// account's order; await the returned pending for durability.
    pub async fn change(
        &self,
        account: AccountId,
        events: Vec<Event>,
    ) -> Result<Judged, MoneyError> {
        // A send to an actor that just retired loses the message: keep a copy.
        for _ in 0..2 {
            if let Ok(judged) = self.actor(account).send(Change(events.clone())).await {
                return judged;
            }
        }
        Err(MoneyError::Unavailable(
            "the account's actor stopped twice: the system is stopping".into(),
        ))
    }
}
