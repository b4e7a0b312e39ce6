//! The sequencer's decisions as records of `troop.sequence` (CLUSTER.md): which
//! ledger record is leaf *i*. Postgres holds the same order, but Kafka is the
//! source of truth: with these records and the ledger partitions, `replay`
//! rebuilds the ledger (same leaves, same root) into an empty database.
//!
//! A leader writes a batch's record before it commits the batch in Postgres.
//! If it dies in between, its successor sequences from what Postgres holds, so
//! it may decide those leaves again, differently: a record that starts at leaf
//! *f* replaces every leaf from *f* on ([`Order::push`]).

use serde::{Deserialize, Serialize};

/// Format version of a record; a reader refuses any other.
const ORDER_VERSION: u8 = 1;

/// Consecutive record numbers of one ledger partition, in leaf order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub partition: i32,
    pub first: u64,
    pub count: u64,
}

/// One batch's decisions: leaves from `first_leaf` on are the runs' records,
/// in order. A batch is read partition by partition, so it is a handful of
/// runs whatever its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRecord {
    pub v: u8,
    pub first_leaf: u64,
    pub runs: Vec<Run>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrderError {
    #[error("order record: {0}")]
    Decode(String),
    #[error("order record version {0} is not {ORDER_VERSION}")]
    Version(u8),
    #[error("an order record starts at leaf {first_leaf}, past the {known} leaves known")]
    Gap { first_leaf: u64, known: u64 },
    #[error("an order record has an empty run")]
    EmptyRun,
}

impl OrderRecord {
    /// The record for leaves `first_leaf..` holding `records` (partition,
    /// record number), in leaf order.
    pub fn new(first_leaf: u64, records: impl IntoIterator<Item = (i32, u64)>) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        for (partition, number) in records {
            match runs.last_mut() {
                Some(r) if r.partition == partition && r.first + r.count == number => r.count += 1,
                _ => runs.push(Run {
                    partition,
                    first: number,
                    count: 1,
                }),
            }
        }
        Self {
            v: ORDER_VERSION,
            first_leaf,
            runs,
        }
    }

    /// Leaves this record decides.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (partition, record number) of each leaf from `first_leaf` on.
    pub fn records(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.runs
            .iter()
            .flat_map(|r| (r.first..r.first + r.count).map(move |n| (r.partition, n)))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain numbers serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, OrderError> {
        let record: Self =
            serde_json::from_slice(bytes).map_err(|e| OrderError::Decode(e.to_string()))?;
        if record.v != ORDER_VERSION {
            return Err(OrderError::Version(record.v));
        }
        if record.runs.iter().any(|r| r.count == 0) {
            return Err(OrderError::EmptyRun);
        }
        Ok(record)
    }
}

/// The ledger's order as the records read so far decide it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Order {
    leaves: Vec<(i32, u64)>,
}

impl Order {
    /// Applies one record in log order: it replaces every leaf from its first
    /// on (a successor's decision wins over a leader that died before its
    /// commit). A record cannot leave a gap.
    pub fn push(&mut self, record: &OrderRecord) -> Result<(), OrderError> {
        let known = self.leaves.len() as u64;
        if record.first_leaf > known {
            return Err(OrderError::Gap {
                first_leaf: record.first_leaf,
                known,
            });
        }
        self.leaves
            .truncate(usize::try_from(record.first_leaf).expect("below the known length"));
        self.leaves.extend(record.records());
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// (partition, record number) of each leaf, in leaf order.
    pub fn leaves(&self) -> &[(i32, u64)] {
        &self.leaves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_becomes_a_few_runs_and_back() {
        let batch = [(0, 4), (0, 5), (0, 6), (1, 0), (1, 2), (3, 9), (3, 10)];
        let record = OrderRecord::new(100, batch);
        assert_eq!(record.runs.len(), 4, "a skipped record number starts a run");
        assert_eq!(record.len(), 7);
        assert_eq!(record.records().collect::<Vec<_>>(), batch);
        let decoded = OrderRecord::decode(&record.encode()).expect("decodes");
        assert_eq!(decoded, record);
        assert!(OrderRecord::new(0, []).is_empty());
    }

    #[test]
    fn bad_records_are_refused() {
        let mut record = OrderRecord::new(0, [(0, 0)]);
        record.v = 2;
        assert_eq!(
            OrderRecord::decode(&record.encode()),
            Err(OrderError::Version(2))
        );
        record.v = ORDER_VERSION;
        record.runs[0].count = 0;
        assert_eq!(
            OrderRecord::decode(&record.encode()),
            Err(OrderError::EmptyRun)
        );
        assert!(matches!(
            OrderRecord::decode(br#"{"v":1,"first_leaf":0,"runs":[],"extra":1}"#),
            Err(OrderError::Decode(_))
        ));
        assert!(matches!(
            OrderRecord::decode(b"\x00garbage"),
            Err(OrderError::Decode(_))
        ));
    }

    #[test]
    fn a_successor_replaces_what_a_dead_leader_decided_past_the_commit() {
        let mut order = Order::default();
        order
            .push(&OrderRecord::new(0, [(0, 0), (1, 0)]))
            .expect("first");
        // The old leader wrote leaves 2..5, then died before its commit.
        order
            .push(&OrderRecord::new(2, [(0, 1), (0, 2), (1, 1)]))
            .expect("second");
        assert_eq!(order.len(), 5);
        // Its successor read Postgres (2 leaves) and decided again.
        order
            .push(&OrderRecord::new(2, [(1, 1), (0, 1)]))
            .expect("successor");
        assert_eq!(order.leaves(), [(0, 0), (1, 0), (1, 1), (0, 1)]);
        assert_eq!(
            order.push(&OrderRecord::new(9, [(0, 3)])),
            Err(OrderError::Gap {
                first_leaf: 9,
                known: 4
            })
        );
        assert_eq!(order.len(), 4, "a refused record changes nothing");
    }
}
