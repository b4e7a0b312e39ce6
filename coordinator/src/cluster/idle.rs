//! How long a node's polling loop waits after finding nothing new. A Kafka
//! broker holds an empty fetch for `fetch.wait.max.ms`, but the brokers of
//! our tests answer at once, and every reader is assigned only while it
//! reads: so the loop's own pause is what sets how often an idle cluster asks
//! its broker (BENCHMARKS.md, issue 4, "which loop"). The pause doubles with
//! every empty round in a row, up to a bound that says how late the first
//! record after a quiet spell may be seen; a round that finds something is
//! never followed by a pause.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdlePause {
    /// The pause after the first empty round.
    pub first: Duration,
    /// The longest pause (a bound under `first` leaves `first`).
    pub max: Duration,
}

impl IdlePause {
    /// The pause after `empty` rounds in a row (≥ 1) found nothing new.
    pub fn after(&self, empty: u32) -> Duration {
        let doublings = empty.saturating_sub(1).min(16);
        self.first
            .saturating_mul(1 << doublings)
            .min(self.max.max(self.first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_their_bound() {
        let pause = IdlePause {
            first: Duration::from_millis(20),
            max: Duration::from_millis(160),
        };
        let ms = |empty| pause.after(empty).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4), ms(5)], [20, 40, 80, 160, 160]);
        assert_eq!(ms(u32::MAX), 160);
        // A bound below the first pause leaves the first pause.
        let tight = IdlePause {
            max: Duration::from_millis(5),
            ..pause
        };
        assert_eq!(tight.after(3), tight.first);
    }
}
