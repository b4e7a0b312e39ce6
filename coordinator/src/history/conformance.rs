//! One suite every [`HistoryLog`] adapter must pass: what is published is
//! read back as the workers' records, each event counted once. A cluster's
//! projector folds what it reads in rounds, so reads wait (bounded) until they
//! show the events; the embedded adapter shows them at once.

use std::collections::HashMap;

use troop_schemas::{JobId, WorkerId};

use super::{HistoryError, HistoryLog, MAX_RECORDS_READ, WorkerEvent, WorkerHistory, WorkerRecord};
use crate::domain::heartbeats::EpochSummary;
use crate::reads::conformance::eventually;

/// Epoch summaries, job starts and failures of two workers fold into their
/// records; a worker without events has none.
pub async fn events_fold_into_records(log: &dyn HistoryLog, workers: [WorkerId; 3]) {
    let [busy, idle, unseen] = workers;
    let job = |n: u8| JobId::derive(&[busy.0.as_slice(), &[n]].concat());
    let events = vec![
        WorkerEvent::JobStarted {
            job: job(1),
            worker: busy,
            model: "m".into(),
            at_ms: 1_000,
        },
        WorkerEvent::job_failed(
            job(1),
            busy,
            "no output before the first-byte deadline",
            1_500,
        ),
        WorkerEvent::JobStarted {
            job: job(2),
            worker: busy,
            model: "m".into(),
            at_ms: 2_000,
        },
        WorkerEvent::Heartbeats(epoch(busy, 0, 12, 900)),
        WorkerEvent::Heartbeats(epoch(idle, 60_000, 4, 61_000)),
        WorkerEvent::Heartbeats(epoch(idle, 120_000, 6, 125_000)),
    ];
    let mut expected = WorkerHistory::default();
    for e in &events {
        expected.apply(e);
    }
    let published: Vec<_> = events.iter().map(|e| log.publish(e)).collect();
    for p in published {
        p.await.expect("published and durable");
    }
    let want: HashMap<WorkerId, WorkerRecord> = [busy, idle]
        .into_iter()
        .map(|w| (w, expected.get(&w).expect("folded").clone()))
        .collect();
    let got = eventually(
        "both workers' records",
        || log.records(vec![busy, idle, unseen]),
        |r| r.as_ref().is_ok_and(|r| r == &want),
    )
    .await
    .expect("read");
    assert_eq!(got[&busy].jobs_started, 2);
    assert_eq!(got[&busy].jobs_failed, 1);
    assert_eq!((got[&idle].epochs, got[&idle].beats), (2, 10));
    assert_eq!(got[&idle].last_seen_ms, 125_000);
    assert!(
        !got.contains_key(&unseen),
        "a worker without events has no record"
    );
}

/// Events published from many tasks at once are each counted once.
pub async fn concurrent_publishes_count_once(log: &dyn HistoryLog, worker: WorkerId) {
    const TASKS: u8 = 4;
    const EACH: u8 = 50;
    let publishes = (0..TASKS).flat_map(|t| {
        (0..EACH).map(move |i| {
            log.publish(&WorkerEvent::JobStarted {
                job: JobId::derive(&[worker.0.as_slice(), &[t, i]].concat()),
                worker,
                model: "m".into(),
                at_ms: u64::from(t) * 1_000 + u64::from(i),
            })
        })
    });
    futures_util::future::try_join_all(publishes)
        .await
        .expect("every publish durable");
    let total = u64::from(TASKS) * u64::from(EACH);
    let got = eventually(
        "every job start counted",
        || log.records(vec![worker]),
        |r| {
            r.as_ref()
                .is_ok_and(|r| r.get(&worker).is_some_and(|w| w.jobs_started >= total))
        },
    )
    .await
    .expect("read");
    assert_eq!(got[&worker].jobs_started, total, "none counted twice");
    assert_eq!(
        got[&worker].last_seen_ms,
        u64::from(TASKS - 1) * 1_000 + u64::from(EACH - 1)
    );
}

/// A read of more workers than the limit is refused, not cut short.
pub async fn a_read_past_the_limit_is_refused(log: &dyn HistoryLog) {
    let many = (0..=MAX_RECORDS_READ)
        .map(|i| WorkerId::derive(&i.to_be_bytes()))
        .collect();
    assert!(matches!(
        log.records(many).await,
        Err(HistoryError::TooMany(n)) if n == MAX_RECORDS_READ + 1
    ));
}

fn epoch(worker: WorkerId, epoch_start_ms: u64, beats: u32, last_beat_ms: u64) -> EpochSummary {
    EpochSummary {
        worker,
        epoch_start_ms,
        epoch_ms: 60_000,
        beats,
        first_beat_ms: epoch_start_ms,
        last_beat_ms,
        min_free_slots: 0,
        total_slots: 2,
        draining: false,
        models: vec!["m".into()],
        gpus: Vec::new(),
    }
}

/// Every test of the suite: `worker(test)` is a new worker for each.
pub async fn run_all(log: &dyn HistoryLog, worker: &dyn Fn(&str) -> WorkerId) {
    events_fold_into_records(
        log,
        [
            worker("fold-busy"),
            worker("fold-idle"),
            worker("fold-unseen"),
        ],
    )
    .await;
    concurrent_publishes_count_once(log, worker("concurrent")).await;
    a_read_past_the_limit_is_refused(log).await;
}
