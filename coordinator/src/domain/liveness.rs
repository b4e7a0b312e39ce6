//! Which coordinator nodes are gone, for voiding their requests' holds: a
//! hold names the node incarnation whose request it is for (its `origin`);
//! when that incarnation stops advertising itself, the request died with it
//! (a restarted node is a new incarnation: its old requests died too).
//!
//! An incarnation is judged gone only after it was seen missing at every
//! look for `dead_after`: a node that missed a few advertisements (a pause,
//! a Postgres hiccup) keeps its holds, and after an outage of the database
//! every node is given the same time to advertise again, since looks happen
//! only while the database answers.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Suspects {
    /// Incarnations seen missing, since when (without a look that saw them).
    since: BTreeMap<String, Instant>,
    dead_after: Duration,
}

impl Suspects {
    pub fn new(dead_after: Duration) -> Self {
        Self {
            since: BTreeMap::new(),
            dead_after,
        }
    }

    /// One look at `now`: `origins` are the incarnations that open holds
    /// name, `live` those advertising themselves. Returns the origins gone
    /// for at least `dead_after`.
    pub fn look(
        &mut self,
        origins: &BTreeSet<String>,
        live: &HashSet<String>,
        now: Instant,
    ) -> BTreeSet<String> {
        // Forget who holds nothing any more, and who is back.
        self.since
            .retain(|o, _| origins.contains(o) && !live.contains(o));
        for o in origins.iter().filter(|o| !live.contains(*o)) {
            self.since.entry(o.clone()).or_insert(now);
        }
        self.since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= self.dead_after)
            .map(|(o, _)| o.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        names.into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn a_node_is_gone_only_after_missing_for_the_whole_wait() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut suspects = Suspects::new(s(10));
        let origins = set(["a/1", "b/1"]);
        let live: HashSet<String> = ["a/1".to_owned()].into();
        assert!(suspects.look(&origins, &live, t0).is_empty());
        assert!(suspects.look(&origins, &live, t0 + s(9)).is_empty());
        assert_eq!(suspects.look(&origins, &live, t0 + s(10)), set(["b/1"]));
        // b/1 advertises again: the wait starts over if it goes missing again.
        let both: HashSet<String> = ["a/1".to_owned(), "b/1".to_owned()].into();
        assert!(suspects.look(&origins, &both, t0 + s(11)).is_empty());
        assert!(suspects.look(&origins, &live, t0 + s(12)).is_empty());
        assert!(suspects.look(&origins, &live, t0 + s(21)).is_empty());
        assert_eq!(suspects.look(&origins, &live, t0 + s(22)), set(["b/1"]));
    }

    #[test]
    fn an_origin_without_holds_is_forgotten() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut suspects = Suspects::new(s(10));
        let nobody = HashSet::new();
        assert!(suspects.look(&set(["c/1"]), &nobody, t0).is_empty());
        // Its holds were settled meanwhile; a later hold of the same name
        // starts its own wait.
        assert!(suspects.look(&set([]), &nobody, t0 + s(5)).is_empty());
        assert!(suspects.look(&set(["c/1"]), &nobody, t0 + s(12)).is_empty());
        assert_eq!(
            suspects.look(&set(["c/1"]), &nobody, t0 + s(22)),
            set(["c/1"])
        );
    }
}
