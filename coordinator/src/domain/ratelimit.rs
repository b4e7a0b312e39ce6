//! Per-account request limits, so that one key cannot starve the network or
//! the coordinator: a token bucket of requests per minute (with a burst) and a
//! cap on requests in flight. Pure: time is an argument.

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

/// One account's allowance: a token bucket of requests and its requests in
/// flight. Owned by the account's actor, so no lock is shared between accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Tokens in thousandths of a request, so refill is exact in integers.
    tokens_milli: u64,
    updated_ms: u64,
    in_flight: u32,
}

impl RateLimits {
    fn capacity_milli(&self) -> u64 {
        u64::from(self.burst.max(1)) * 1000
    }
}

impl Allowance {
    /// A full bucket, nothing in flight.
    pub fn new(limits: &RateLimits, now_ms: u64) -> Self {
        Self {
            tokens_milli: limits.capacity_milli(),
            updated_ms: now_ms,
            in_flight: 0,
        }
    }

    fn refill(&mut self, limits: &RateLimits, now_ms: u64) {
        // rpm requests a minute is rpm / 60 thousandths of a request a millisecond.
        let rpm = u64::from(limits.requests_per_minute);
        let elapsed_ms = now_ms.saturating_sub(self.updated_ms);
        self.tokens_milli = limits
            .capacity_milli()
            .min(self.tokens_milli + elapsed_ms.saturating_mul(rpm) / 60);
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// Takes a place for one request at `now_ms`, or says why not. Every
    /// success must be matched by one [`Allowance::release`].
    pub fn acquire(&mut self, limits: &RateLimits, now_ms: u64) -> Result<(), Refusal> {
        self.refill(limits, now_ms);
        let rpm = u64::from(limits.requests_per_minute);
        if limits.max_in_flight > 0 && self.in_flight >= limits.max_in_flight {
            return Err(Refusal::InFlight {
                max: limits.max_in_flight,
            });
        }
        if rpm > 0 {
            if self.tokens_milli < 1000 {
                let missing = 1000 - self.tokens_milli;
                return Err(Refusal::Rate {
                    retry_after_ms: (missing * 60).div_ceil(rpm),
                });
            }
            self.tokens_milli -= 1000;
        }
        self.in_flight += 1;
        Ok(())
    }

    /// A request ended (any way at all).
    pub fn release(&mut self) {
        assert!(self.in_flight > 0, "more releases than acquires");
        self.in_flight -= 1;
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Nothing in flight and a full bucket: forgetting this allowance and
    /// starting a fresh one later changes nothing.
    pub fn is_idle(&self, limits: &RateLimits, now_ms: u64) -> bool {
        let mut refilled = *self;
        refilled.refill(limits, now_ms);
        refilled.in_flight == 0
            && (limits.requests_per_minute == 0 || refilled.tokens_milli >= limits.capacity_milli())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests_per_minute: u32, burst: u32, max_in_flight: u32) -> RateLimits {
        RateLimits {
            requests_per_minute,
            burst,
            max_in_flight,
        }
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let l = limits(60, 3, 0);
        let mut a = Allowance::new(&l, 0);
        for _ in 0..3 {
            a.acquire(&l, 0).expect("within the burst");
            a.release();
        }
        assert_eq!(
            a.acquire(&l, 0),
            Err(Refusal::Rate {
                retry_after_ms: 1000
            })
        );
        assert_eq!(
            a.acquire(&l, 400),
            Err(Refusal::Rate {
                retry_after_ms: 600
            })
        );
        a.acquire(&l, 1000).expect("one a second");
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
        let l = limits(60_000, 2, 0);
        let mut a = Allowance::new(&l, 0);
        a.acquire(&l, 0).expect("first");
        // An hour idle refills to the burst, not to an hour's worth.
        for _ in 0..2 {
            a.acquire(&l, 3_600_000).expect("burst");
        }
        assert!(a.acquire(&l, 3_600_000).is_err());
        assert!(
            a.acquire(&l, 3_600_001).is_ok(),
            "1000 a second: one per ms"
        );
    }

    #[test]
    fn in_flight_places_are_freed_by_release() {
        let l = limits(0, 1, 2);
        let mut a = Allowance::new(&l, 0);
        a.acquire(&l, 0).expect("1");
        a.acquire(&l, 0).expect("2");
        assert_eq!(a.acquire(&l, 0), Err(Refusal::InFlight { max: 2 }));
        a.release();
        a.acquire(&l, 0).expect("a place came free");
        assert_eq!(a.in_flight(), 2);
        let mut b = Allowance::new(&l, 0);
        for _ in 0..1000 {
            b.acquire(&l, 0).expect("rate 0 is no bucket");
            b.release();
        }
    }

    #[test]
    fn idle_only_when_nothing_runs_and_the_bucket_is_full() {
        let l = limits(60, 1, 0);
        let mut a = Allowance::new(&l, 0);
        assert!(a.is_idle(&l, 0));
        a.acquire(&l, 0).expect("busy");
        assert!(!a.is_idle(&l, 60_000), "a request in flight");
        a.release();
        assert!(!a.is_idle(&l, 500), "the bucket is still refilling");
        assert!(
            a.is_idle(&l, 1_000),
            "refilled: a fresh allowance is the same"
        );
    }
}
