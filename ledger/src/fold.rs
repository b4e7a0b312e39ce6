//! The double-entry fold: a pure function from a sequence of ledger events to
//! balances. No clock, no IO: replaying the same log always gives the same state.
//!
//! Accounts keep TigerBeetle-style posted and pending columns. Invariants,
//! asserted after every applied event:
//! - every posting moves the same amount out of one account and into another,
//!   so posted debits equal posted credits over all accounts (treasury included);
//! - no account but the treasury has a negative available balance
//!   (credits − debits − pending);
//! - pending totals equal the sum of open holds;
//! - a hold resolves (settle, void, expire) exactly once.
//!
//! Facts the whole network shares (price schedules, coordinator keys) only
//! ever grow: a hold names the schedule version it was priced at and is
//! settled at that version, and a receipt may be countersigned by any
//! coordinator key published so far. So an event a cluster owner judged
//! against its fold stays valid however many of those facts the sequencer
//! orders in between (CLUSTER.md, "Network-wide facts").
//!
//! An event that would break a rule is refused with a [`FoldError`] and leaves
//! the state unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};

use troop_schemas::{
    AccountId, AccountRole, CountersignedReceipt, CreditsMicro, Digest, Event, HoldId, JobId,
    KeyRole, PublicKey, WorkerId,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FoldError {
    #[error("account {0} does not exist")]
    UnknownAccount(AccountId),
    #[error("account {0} already exists")]
    DuplicateAccount(AccountId),
    #[error("the treasury cannot be used here")]
    Treasury,
    #[error("amount must be positive")]
    ZeroAmount,
    #[error("account {account} has {available} available, needs {needed}")]
    InsufficientFunds {
        account: AccountId,
        available: i128,
        needed: u64,
    },
    #[error("hold {0} already exists or was resolved")]
    DuplicateHold(HoldId),
    #[error("hold {0} is not open (unknown, or already settled, voided or expired)")]
    HoldNotOpen(HoldId),
    #[error("hold expires before it is placed")]
    HoldExpiry,
    #[error("hold {hold} expires at {expires_at_ms}, expiry event is at {at_ms}")]
    ExpiredTooEarly {
        hold: HoldId,
        expires_at_ms: u64,
        at_ms: u64,
    },
    #[error("worker {0} is not registered")]
    UnknownWorker(WorkerId),
    #[error("worker {0} is already registered")]
    DuplicateWorker(WorkerId),
    #[error("worker id is not derived from the worker's key")]
    WorkerIdMismatch,
    #[error("account {0} is not a worker account")]
    NotWorkerAccount(AccountId),
    #[error("receipt does not match its hold: {0}")]
    ReceiptMismatch(&'static str),
    #[error("receipt is countersigned by a key that was never published as a coordinator key")]
    WrongCoordinatorKey,
    #[error("receipt's worker key is not the key registered for worker {0}")]
    WrongWorkerKey(WorkerId),
    #[error("no price schedule has been published")]
    NoPriceSchedule,
    #[error("price schedule version {0} has not been published")]
    UnknownScheduleVersion(u64),
    #[error("model {0:?} has no price")]
    UnknownModel(String),
    #[error(
        "settlement amounts are wrong: charged {charged} (expected {expected}), fee {fee} (expected {expected_fee}), earned {earned}"
    )]
    WrongSettlement {
        charged: u64,
        expected: u64,
        fee: u64,
        expected_fee: u64,
        earned: u64,
    },
    #[error("an empty response is voided, never settled")]
    EmptySettlement,
    #[error("price schedule version {got} does not follow {current}")]
    ScheduleVersion { got: u64, current: u64 },
    #[error("fee of {0} basis points is above 100%")]
    FeeTooHigh(u64),
    #[error("model {0:?} is priced twice or has an empty name")]
    BadModel(String),
    #[error("uptime for worker {worker} epoch {epoch} was already rewarded")]
    DuplicateReward { worker: WorkerId, epoch: u64 },
    #[error("balance snapshot does not match the replayed state")]
    SnapshotMismatch,
    #[error("transfer to the same account")]
    SelfTransfer,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub role: Option<AccountRole>,
    pub debits_posted: u128,
    pub credits_posted: u128,
    pub debits_pending: u128,
}

impl Account {
    /// Posted balance: credits minus debits.
    pub fn balance(&self) -> i128 {
        // Totals are bounded by 2^53 per posting times far fewer than 2^64 postings.
        i128::try_from(self.credits_posted).expect("bounded")
            - i128::try_from(self.debits_posted).expect("bounded")
    }

    /// What can still be reserved or spent.
    pub fn available(&self) -> i128 {
        self.balance() - i128::try_from(self.debits_pending).expect("bounded")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub account: AccountId,
    pub job: JobId,
    pub model: String,
    pub amount: CreditsMicro,
    pub expires_at_ms: u64,
    /// The schedule the hold was priced at, and its settlement is charged at.
    pub schedule_version: u64,
    /// The node incarnation whose request it is for (cluster only).
    #[serde(default)]
    pub origin: Option<String>,
}

impl Hold {
    /// The hold a `hold_placed` event opens, with its id; `None` for any
    /// other event.
    pub fn placed(event: &Event) -> Option<(HoldId, Self)> {
        let Event::HoldPlaced {
            hold,
            job,
            account,
            model,
            amount_micro,
            expires_at_ms,
            schedule_version,
            origin,
            ..
        } = event
        else {
            return None;
        };
        Some((
            *hold,
            Self {
                account: *account,
                job: *job,
                model: model.clone(),
                amount: *amount_micro,
                expires_at_ms: *expires_at_ms,
                schedule_version: *schedule_version,
                origin: origin.clone(),
            },
        ))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Price {
    pub input_micro_per_1k: u64,
    pub output_micro_per_1k: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub version: u64,
    pub fee_bps: u64,
    pub prices: HashMap<String, Price>,
}

/// What a settlement must charge, given the schedule and the hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub charged: u64,
    pub fee: u64,
    pub earned: u64,
}

/// ceil(tokens × price / 1000): a partial thousand is charged pro rata, rounded
/// up so that a request is never free by rounding.
fn token_cost(tokens: u64, per_1k: u64) -> u128 {
    (u128::from(tokens) * u128::from(per_1k)).div_ceil(1000)
}

impl Schedule {
    /// The charge for `billed` tokens of `model`, capped at the hold: a consumer
    /// never pays more than it reserved. Fee is floor(charged × bps / 10 000).
    pub fn charge(
        &self,
        model: &str,
        input_tokens: u64,
        output_tokens: u64,
        reserved: CreditsMicro,
    ) -> Result<Charge, FoldError> {
        let p = self
            .prices
            .get(model)
            .ok_or_else(|| FoldError::UnknownModel(model.to_owned()))?;
        let cost = token_cost(input_tokens, p.input_micro_per_1k)
            + token_cost(output_tokens, p.output_micro_per_1k);
        let charged = u64::try_from(cost.min(u128::from(reserved.get()))).expect("≤ reserved");
        let fee = u64::try_from(u128::from(charged) * u128::from(self.fee_bps) / 10_000)
            .expect("≤ charged");
        Ok(Charge {
            charged,
            fee,
            earned: charged - fee,
        })
    }

    /// The largest charge `max_tokens` of output plus `input_tokens` could cost.
    pub fn estimate(
        &self,
        model: &str,
        input_tokens: u64,
        max_output_tokens: u64,
    ) -> Result<u64, FoldError> {
        let p = self
            .prices
            .get(model)
            .ok_or_else(|| FoldError::UnknownModel(model.to_owned()))?;
        let cost = token_cost(input_tokens, p.input_micro_per_1k)
            + token_cost(max_output_tokens, p.output_micro_per_1k);
        Ok(u64::try_from(cost.min(u128::from(CreditsMicro::MAX.get()))).expect("capped"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Worker {
    pub key: PublicKey,
    pub account: AccountId,
}

/// The ledger's state. Build it by [`Ledger::apply`]ing events in log order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    accounts: HashMap<AccountId, Account>,
    holds: HashMap<HoldId, Hold>,
    resolved_holds: HashSet<HoldId>,
    workers: HashMap<WorkerId, Worker>,
    rewarded: HashSet<(WorkerId, u64)>,
    /// Every schedule ever published, by version: a hold may still be open at
    /// an old one. Operators publish a handful, so keeping all is cheap.
    schedules: BTreeMap<u64, Schedule>,
    coordinator_key: Option<PublicKey>,
    /// Every coordinator key ever published. A rotation retires a key for new
    /// countersignatures (an honest coordinator signs with its newest) but
    /// does not revoke it: revoking needs its own entry (roadmap).
    coordinator_keys: HashSet<PublicKey>,
    /// Holds placed at a schedule that a newer one had already replaced at
    /// their position: a lagging owner's, reported by auditors.
    holds_priced_stale: u64,
    log_key: Option<(String, PublicKey)>,
    total_debits: u128,
    total_credits: u128,
    total_pending: u128,
    applied: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    pub fn new() -> Self {
        let mut accounts = HashMap::new();
        accounts.insert(AccountId::TREASURY, Account::default());
        Self {
            accounts,
            holds: HashMap::new(),
            resolved_holds: HashSet::new(),
            workers: HashMap::new(),
            rewarded: HashSet::new(),
            schedules: BTreeMap::new(),
            coordinator_key: None,
            coordinator_keys: HashSet::new(),
            holds_priced_stale: 0,
            log_key: None,
            total_debits: 0,
            total_credits: 0,
            total_pending: 0,
            applied: 0,
        }
    }

    pub fn account(&self, id: &AccountId) -> Option<&Account> {
        self.accounts.get(id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = (&AccountId, &Account)> {
        self.accounts.iter()
    }

    pub fn hold(&self, id: &HoldId) -> Option<&Hold> {
        self.holds.get(id)
    }

    pub fn open_holds(&self) -> impl Iterator<Item = (&HoldId, &Hold)> {
        self.holds.iter()
    }

    pub fn worker(&self, id: &WorkerId) -> Option<&Worker> {
        self.workers.get(id)
    }

    /// The newest price schedule: the one new holds are priced at.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedules.values().next_back()
    }

    /// A published schedule by version, current or replaced.
    pub fn schedule_version(&self, version: u64) -> Option<&Schedule> {
        self.schedules.get(&version)
    }

    /// Holds placed at a schedule that had already been replaced (see
    /// [`Event::HoldPlaced`]): valid, but a sign of an owner lagging behind.
    pub fn holds_priced_stale(&self) -> u64 {
        self.holds_priced_stale
    }

    pub fn coordinator_key(&self) -> Option<&PublicKey> {
        self.coordinator_key.as_ref()
    }

    pub fn log_key(&self) -> Option<&(String, PublicKey)> {
        self.log_key.as_ref()
    }

    /// Events applied so far (refused ones not counted).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    fn existing(&self, id: &AccountId) -> Result<&Account, FoldError> {
        self.accounts.get(id).ok_or(FoldError::UnknownAccount(*id))
    }

    fn spendable(&self, id: &AccountId, needed: CreditsMicro) -> Result<(), FoldError> {
        if *id == AccountId::TREASURY {
            return Err(FoldError::Treasury);
        }
        let available = self.existing(id)?.available();
        if available < i128::from(needed.get()) {
            return Err(FoldError::InsufficientFunds {
                account: *id,
                available,
                needed: needed.get(),
            });
        }
        Ok(())
    }

    fn open_hold(&self, hold: &HoldId) -> Result<&Hold, FoldError> {
        self.holds.get(hold).ok_or(FoldError::HoldNotOpen(*hold))
    }

    /// Checks `event` against the current state without changing anything.
    pub fn check(&self, event: &Event) -> Result<(), FoldError> {
        match event {
            Event::AccountOpened { account, .. } => {
                if *account == AccountId::TREASURY {
                    return Err(FoldError::Treasury);
                }
                if self.accounts.contains_key(account) {
                    return Err(FoldError::DuplicateAccount(*account));
                }
            }
            Event::WorkerRegistered {
                worker,
                key,
                account,
                ..
            } => {
                if WorkerId::from_key(key) != *worker {
                    return Err(FoldError::WorkerIdMismatch);
                }
                if self.workers.contains_key(worker) {
                    return Err(FoldError::DuplicateWorker(*worker));
                }
                if self.existing(account)?.role != Some(AccountRole::Worker) {
                    return Err(FoldError::NotWorkerAccount(*account));
                }
            }
            Event::Grant {
                account,
                amount_micro,
                ..
            } => {
                if *account == AccountId::TREASURY {
                    return Err(FoldError::Treasury);
                }
                self.existing(account)?;
                if amount_micro.get() == 0 {
                    return Err(FoldError::ZeroAmount);
                }
            }
            Event::HoldPlaced {
                hold,
                account,
                model,
                amount_micro,
                expires_at_ms,
                at_ms,
                schedule_version,
                ..
            } => {
                if self.holds.contains_key(hold) || self.resolved_holds.contains(hold) {
                    return Err(FoldError::DuplicateHold(*hold));
                }
                if amount_micro.get() == 0 {
                    return Err(FoldError::ZeroAmount);
                }
                if expires_at_ms <= at_ms {
                    return Err(FoldError::HoldExpiry);
                }
                let schedule = self
                    .schedules
                    .get(schedule_version)
                    .ok_or(FoldError::UnknownScheduleVersion(*schedule_version))?;
                if !schedule.prices.contains_key(model) {
                    return Err(FoldError::UnknownModel(model.clone()));
                }
                self.spendable(account, *amount_micro)?;
            }
            Event::HoldSettled {
                hold,
                receipt,
                charged_micro,
                worker_earned_micro,
                fee_micro,
                ..
            } => {
                let h = self.open_hold(hold)?;
                self.check_receipt(*hold, h, receipt)?;
                if receipt.billed_output_tokens == 0 {
                    return Err(FoldError::EmptySettlement);
                }
                let schedule = &self.schedules[&h.schedule_version];
                let want = schedule.charge(
                    &h.model,
                    receipt.billed_input_tokens,
                    receipt.billed_output_tokens,
                    h.amount,
                )?;
                let got = Charge {
                    charged: charged_micro.get(),
                    fee: fee_micro.get(),
                    earned: worker_earned_micro.get(),
                };
                if got != want {
                    return Err(FoldError::WrongSettlement {
                        charged: got.charged,
                        expected: want.charged,
                        fee: got.fee,
                        expected_fee: want.fee,
                        earned: got.earned,
                    });
                }
            }
            Event::HoldVoided { hold, .. } => {
                self.open_hold(hold)?;
            }
            Event::HoldExpired { hold, at_ms } => {
                let h = self.open_hold(hold)?;
                if *at_ms < h.expires_at_ms {
                    return Err(FoldError::ExpiredTooEarly {
                        hold: *hold,
                        expires_at_ms: h.expires_at_ms,
                        at_ms: *at_ms,
                    });
                }
            }
            Event::Transfer {
                from,
                to,
                amount_micro,
                ..
            } => {
                if from == to {
                    return Err(FoldError::SelfTransfer);
                }
                if *to == AccountId::TREASURY {
                    return Err(FoldError::Treasury);
                }
                if amount_micro.get() == 0 {
                    return Err(FoldError::ZeroAmount);
                }
                self.existing(to)?;
                self.spendable(from, *amount_micro)?;
            }
            Event::UptimeReward {
                worker,
                epoch,
                amount_micro,
                ..
            } => {
                if !self.workers.contains_key(worker) {
                    return Err(FoldError::UnknownWorker(*worker));
                }
                if self.rewarded.contains(&(*worker, *epoch)) {
                    return Err(FoldError::DuplicateReward {
                        worker: *worker,
                        epoch: *epoch,
                    });
                }
                if amount_micro.get() == 0 {
                    return Err(FoldError::ZeroAmount);
                }
            }
            Event::PriceSchedulePublished {
                version,
                fee_bps,
                prices,
                ..
            } => {
                let current = self.schedule().map_or(0, |s| s.version);
                if *version <= current {
                    return Err(FoldError::ScheduleVersion {
                        got: *version,
                        current,
                    });
                }
                if *fee_bps > 10_000 {
                    return Err(FoldError::FeeTooHigh(*fee_bps));
                }
                let mut seen = HashSet::new();
                for p in prices {
                    if p.model.is_empty() || !seen.insert(p.model.as_str()) {
                        return Err(FoldError::BadModel(p.model.clone()));
                    }
                }
            }
            Event::KeyRotated { .. } => {}
            Event::BalanceSnapshot {
                accounts,
                open_holds,
                pending_micro,
                balances_digest,
                ..
            } => {
                let ok = *accounts == self.accounts.len() as u64
                    && *open_holds == self.holds.len() as u64
                    && u128::from(pending_micro.get()) == self.total_pending
                    && *balances_digest == self.balances_digest();
                if !ok {
                    return Err(FoldError::SnapshotMismatch);
                }
            }
        }
        Ok(())
    }

    fn check_receipt(
        &self,
        hold_id: HoldId,
        hold: &Hold,
        r: &CountersignedReceipt,
    ) -> Result<(), FoldError> {
        let body = &r.receipt;
        if body.hold != hold_id {
            return Err(FoldError::ReceiptMismatch("hold"));
        }
        if body.job != hold.job {
            return Err(FoldError::ReceiptMismatch("job"));
        }
        if body.consumer != hold.account {
            return Err(FoldError::ReceiptMismatch("consumer"));
        }
        if body.model != hold.model {
            return Err(FoldError::ReceiptMismatch("model"));
        }
        if body.finished_at_ms < body.started_at_ms {
            return Err(FoldError::ReceiptMismatch("finished before started"));
        }
        let worker = self
            .workers
            .get(&body.worker)
            .ok_or(FoldError::UnknownWorker(body.worker))?;
        if worker.key != body.worker_key {
            return Err(FoldError::WrongWorkerKey(body.worker));
        }
        if !self.coordinator_keys.contains(&r.coordinator_key) {
            return Err(FoldError::WrongCoordinatorKey);
        }
        Ok(())
    }

    /// Applies one event: checks it, then changes the state. A refused event
    /// changes nothing.
    pub fn apply(&mut self, event: &Event) -> Result<(), FoldError> {
        self.check(event)?;
        match event {
            Event::AccountOpened { account, role, .. } => {
                self.accounts.insert(
                    *account,
                    Account {
                        role: Some(*role),
                        ..Account::default()
                    },
                );
            }
            Event::WorkerRegistered {
                worker,
                key,
                account,
                ..
            } => {
                self.workers.insert(
                    *worker,
                    Worker {
                        key: *key,
                        account: *account,
                    },
                );
            }
            Event::Grant {
                account,
                amount_micro,
                ..
            } => {
                self.post(AccountId::TREASURY, *account, amount_micro.get());
            }
            Event::HoldPlaced { .. } => {
                let (id, hold) = Hold::placed(event).expect("a hold_placed event");
                if self
                    .schedule()
                    .is_some_and(|s| s.version != hold.schedule_version)
                {
                    self.holds_priced_stale += 1;
                }
                self.pend(hold.account, i128::from(hold.amount.get()));
                self.holds.insert(id, hold);
            }
            Event::HoldSettled {
                hold,
                receipt,
                worker_earned_micro,
                fee_micro,
                ..
            } => {
                let h = self.resolve(*hold);
                let worker_account = self.workers[&receipt.receipt.worker].account;
                self.post(h.account, worker_account, worker_earned_micro.get());
                self.post(h.account, AccountId::TREASURY, fee_micro.get());
            }
            Event::HoldVoided { hold, .. } | Event::HoldExpired { hold, .. } => {
                self.resolve(*hold);
            }
            Event::Transfer {
                from,
                to,
                amount_micro,
                ..
            } => {
                self.post(*from, *to, amount_micro.get());
            }
            Event::UptimeReward {
                worker,
                epoch,
                amount_micro,
                ..
            } => {
                let account = self.workers[worker].account;
                self.rewarded.insert((*worker, *epoch));
                self.post(AccountId::TREASURY, account, amount_micro.get());
            }
            Event::PriceSchedulePublished {
                version,
                fee_bps,
                prices,
                ..
            } => {
                let schedule = Schedule {
                    version: *version,
                    fee_bps: *fee_bps,
                    prices: prices
                        .iter()
                        .map(|p| {
                            (
                                p.model.clone(),
                                Price {
                                    input_micro_per_1k: p.input_micro_per_1k.get(),
                                    output_micro_per_1k: p.output_micro_per_1k.get(),
                                },
                            )
                        })
                        .collect(),
                };
                self.schedules.insert(*version, schedule);
            }
            Event::KeyRotated {
                role, name, key, ..
            } => match role {
                KeyRole::Coordinator => {
                    self.coordinator_key = Some(*key);
                    self.coordinator_keys.insert(*key);
                }
                KeyRole::Log => self.log_key = Some((name.clone(), *key)),
            },
            Event::BalanceSnapshot { .. } => {}
        }
        self.applied += 1;
        self.assert_invariants_cheap();
        Ok(())
    }

    fn resolve(&mut self, hold: HoldId) -> Hold {
        let h = self.holds.remove(&hold).expect("checked open");
        let fresh = self.resolved_holds.insert(hold);
        assert!(fresh, "hold {hold} resolved twice");
        self.pend(h.account, -i128::from(h.amount.get()));
        h
    }

    fn pend(&mut self, account: AccountId, delta: i128) {
        let a = self.accounts.get_mut(&account).expect("checked");
        let magnitude = delta.unsigned_abs();
        if delta >= 0 {
            a.debits_pending += magnitude;
            self.total_pending += magnitude;
        } else {
            a.debits_pending = a
                .debits_pending
                .checked_sub(magnitude)
                .expect("pending never negative");
            self.total_pending = self
                .total_pending
                .checked_sub(magnitude)
                .expect("pending never negative");
        }
    }

    /// One balanced posting: the same amount out of `from` and into `to`.
    fn post(&mut self, from: AccountId, to: AccountId, amount: u64) {
        if amount == 0 {
            return;
        }
        let amount = u128::from(amount);
        self.accounts.get_mut(&from).expect("checked").debits_posted += amount;
        self.accounts.get_mut(&to).expect("checked").credits_posted += amount;
        self.total_debits += amount;
        self.total_credits += amount;
        assert!(
            from == AccountId::TREASURY || self.accounts[&from].available() >= 0,
            "account {from} overdrawn"
        );
    }

    /// O(1) invariants checked after every event.
    fn assert_invariants_cheap(&self) {
        assert_eq!(
            self.total_debits, self.total_credits,
            "postings do not balance"
        );
    }

    /// Every invariant, by a full scan. Auditors run it at the end of a replay;
    /// tests after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut sum: i128 = 0;
        let mut pending: u128 = 0;
        for (id, a) in &self.accounts {
            sum += a.balance();
            pending += a.debits_pending;
            if *id != AccountId::TREASURY && a.available() < 0 {
                return Err(format!(
                    "account {id} has negative available balance {}",
                    a.available()
                ));
            }
        }
        if sum != 0 {
            return Err(format!("balances sum to {sum}, not zero"));
        }
        let holds: u128 = self
            .holds
            .values()
            .map(|h| u128::from(h.amount.get()))
            .sum();
        if pending != holds || pending != self.total_pending {
            return Err(format!(
                "pending {pending} ≠ open holds {holds} ≠ running total {}",
                self.total_pending
            ));
        }
        if self.holds.keys().any(|h| self.resolved_holds.contains(h)) {
            return Err("a hold is both open and resolved".into());
        }
        Ok(())
    }

    /// BLAKE3 over every account's columns in id order: one line per account,
    /// `<id> <credits_posted> <debits_posted> <debits_pending>\n`.
    pub fn balances_digest(&self) -> Digest {
        let sorted: BTreeMap<&AccountId, &Account> = self.accounts.iter().collect();
        let mut h = blake3_hasher();
        for (id, a) in sorted {
            h.update(
                format!(
                    "{id} {} {} {}\n",
                    a.credits_posted, a.debits_posted, a.debits_pending
                )
                .as_bytes(),
            );
        }
        Digest(*h.finalize().as_bytes())
    }

    /// A snapshot event describing the current state.
    pub fn snapshot(&self, at_ms: u64) -> Event {
        Event::BalanceSnapshot {
            accounts: self.accounts.len() as u64,
            open_holds: self.holds.len() as u64,
            pending_micro: CreditsMicro::new(u64::try_from(self.total_pending).unwrap_or(u64::MAX))
                .unwrap_or(CreditsMicro::MAX),
            balances_digest: self.balances_digest(),
            at_ms,
        }
    }
}

fn blake3_hasher() -> blake3::Hasher {
    blake3::Hasher::new_derive_key("troop balances digest v1")
}
