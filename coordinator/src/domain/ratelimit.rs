//! Per-account request limits, so that one key cannot starve the network or
//! the coordinator: a token bucket of requests per minute (with a burst) and a
//! cap on requests in flight. Pure: time is an argument.

use std::collections::HashMap;

use troop_schemas::AccountId;

/// Beyond this many tracked accounts, idle ones (full bucket, nothing in
/// flight, so forgetting them changes nothing) are dropped.
const PRUNE_AT: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Sustained requests per minute per account; 0 turns the bucket off.
    pub requests_per_minute: u32,
    /// Requests an idle account may send at once before the rate applies.
    pub burst: u32,
    /// Requests of one account running at once; 0 means no cap.
    pub max_in_flight: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            requests_per_minute: 600,
            burst: 60,
            max_in_flight: 64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the rate: a request is allowed again after this long.
    Rate { retry_after_ms: u64 },
    /// Too many requests in flight; one ending frees a place.
    InFlight { max: u32 },
}

impl Refusal {
    /// Whole seconds for a `Retry-After` header (at least 1).
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Refusal::Rate { retry_after_ms } => retry_after_ms.div_ceil(1000).max(1),
            Refusal::InFlight { .. } => 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in thousandths of a request, so refill is exact in integers.
    tokens_milli: u64,
    updated_ms: u64,
    in_flight: u32,
}

#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    buckets: HashMap<AccountId, Bucket>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            buckets: HashMap::new(),
        }
    }

    fn capacity_milli(&self) -> u64 {
        u64::from(self.limits.burst.max(1)) * 1000
    }

    /// Takes a place for one request of `account` at `now_ms`, or says why not.
    /// Every success must be matched by one [`RateLimiter::release`].
    pub fn acquire(&mut self, account: AccountId, now_ms: u64) -> Result<(), Refusal> {
        if self.buckets.len() >= PRUNE_AT {
            self.prune(now_ms);
        }
        let capacity = self.capacity_milli();
        let (rpm, max_in_flight) = (
            u64::from(self.limits.requests_per_minute),
            self.limits.max_in_flight,
        );
        let b = self.buckets.entry(account).or_insert(Bucket {
            tokens_milli: capacity,
            updated_ms: now_ms,
            in_flight: 0,
        });
        // rpm requests a minute is rpm / 60 thousandths of a request a millisecond.
        let elapsed_ms = now_ms.saturating_sub(b.updated_ms);
        b.tokens_milli = capacity.min(b.tokens_milli + elapsed_ms.saturating_mul(rpm) / 60);
        b.updated_ms = b.updated_ms.max(now_ms);
        if max_in_flight > 0 && b.in_flight >= max_in_flight {
            return Err(Refusal::InFlight { max: max_in_flight });
        }
        if rpm > 0 {
            if b.tokens_milli < 1000 {
                let missing = 1000 - b.tokens_milli;
                return Err(Refusal::Rate {
                    retry_after_ms: (missing * 60).div_ceil(rpm),
                });
            }
            b.tokens_milli -= 1000;
        }
        b.in_flight += 1;
        Ok(())
    }

    /// A request of `account` ended (any way at all).
    pub fn release(&mut self, account: AccountId) {
        let b = self
            .buckets
            .get_mut(&account)
            .expect("release follows a successful acquire");
        assert!(b.in_flight > 0, "more releases than acquires");
        b.in_flight -= 1;
    }

    /// Accounts tracked now (bounded by pruning).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn prune(&mut self, now_ms: u64) {
        let (capacity, rpm) = (
            self.capacity_milli(),
            u64::from(self.limits.requests_per_minute),
        );
        self.buckets.retain(|_, b| {
            let refilled =
                b.tokens_milli + now_ms.saturating_sub(b.updated_ms).saturating_mul(rpm) / 60;
            b.in_flight > 0 || (rpm > 0 && refilled < capacity)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(n: u8) -> AccountId {
        AccountId([n; 16])
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut l = RateLimiter::new(RateLimits {
            requests_per_minute: 60,
            burst: 3,
            max_in_flight: 0,
        });
        for _ in 0..3 {
            l.acquire(acct(1), 0).expect("within the burst");
            l.release(acct(1));
        }
        assert_eq!(
            l.acquire(acct(1), 0),
            Err(Refusal::Rate {
                retry_after_ms: 1000
            })
        );
        assert_eq!(
            l.acquire(acct(1), 400),
            Err(Refusal::Rate {
                retry_after_ms: 600
            })
        );
        l.acquire(acct(1), 1000).expect("one a second");
        l.acquire(acct(2), 0)
            .expect("accounts do not share a bucket");
        assert_eq!(Refusal::Rate { retry_after_ms: 1 }.retry_after_s(), 1);
        assert_eq!(
            Refusal::Rate {
                retry_after_ms: 1001
            }
            .retry_after_s(),
            2
        );
    }

    #[test]
    fn the_bucket_never_holds_more_than_the_burst() {
        let mut l = RateLimiter::new(RateLimits {
            requests_per_minute: 60_000,
            burst: 2,
            max_in_flight: 0,
        });
        l.acquire(acct(1), 0).expect("first");
        // An hour idle refills to the burst, not to an hour's worth.
        for _ in 0..2 {
            l.acquire(acct(1), 3_600_000).expect("burst");
        }
        assert!(l.acquire(acct(1), 3_600_000).is_err());
        assert!(
            l.acquire(acct(1), 3_600_001).is_ok(),
            "1000 a second: one per ms"
        );
    }

    #[test]
    fn in_flight_places_are_freed_by_release() {
        let mut l = RateLimiter::new(RateLimits {
            requests_per_minute: 0,
            burst: 1,
            max_in_flight: 2,
        });
        l.acquire(acct(1), 0).expect("1");
        l.acquire(acct(1), 0).expect("2");
        assert_eq!(l.acquire(acct(1), 0), Err(Refusal::InFlight { max: 2 }));
        l.release(acct(1));
        l.acquire(acct(1), 0).expect("a place came free");
        for _ in 0..1000 {
            l.acquire(acct(2), 0).expect("rate 0 is no bucket");
            l.release(acct(2));
        }
    }

    #[test]
    fn idle_accounts_are_forgotten_not_running_ones() {
        let mut l = RateLimiter::new(RateLimits {
            requests_per_minute: 60,
            burst: 1,
            max_in_flight: 0,
        });
        l.acquire(acct(1), 0).expect("busy");
        l.acquire(acct(2), 0).expect("idle later");
        l.release(acct(2));
        l.prune(60_000);
        assert_eq!(l.tracked(), 1, "only the one with a request in flight");
        l.release(acct(1));
    }
}
