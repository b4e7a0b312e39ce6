//! Prometheus metrics, served at `/metrics`.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// The steps of a request before its first byte reaches the consumer, in
/// order (labels of `troop_request_phase_seconds`): where added
/// time-to-first-token goes, path by path (BENCHMARKS.md, cluster TTFT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// From the request (its body read) to its hold asked of the books:
    /// authenticated, admitted by its account, validated, its session started
    /// and the hold priced.
    Admitted,
    /// From the hold asked to the books' verdict on it (on a cluster, the
    /// owner's first line when another node owns the account).
    HoldJudged,
    /// From the verdict to the job handed to a worker (a local one's actor,
    /// or a serving node that named its worker).
    Placed,
    /// From the job handed over to the worker's first byte here.
    FirstByte,
    /// After the first byte, waiting until the hold's record was durable.
    HoldDurable,
    /// On the node serving a job relayed from another: from the relay's
    /// request (its body read) to the job handed to a worker here. The rest
    /// of the consumer node's `placed` for that job is the relay's round trip.
    RelayPlaced,
    /// On the serving node: from the relayed job handed over to its worker's
    /// first byte here.
    RelayFirstByte,
}

impl Phase {
    pub const ALL: [Self; 7] = [
        Self::Admitted,
        Self::HoldJudged,
        Self::Placed,
        Self::FirstByte,
        Self::HoldDurable,
        Self::RelayPlaced,
        Self::RelayFirstByte,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Admitted => "admitted",
            Self::HoldJudged => "hold_judged",
            Self::Placed => "placed",
            Self::FirstByte => "first_byte",
            Self::HoldDurable => "hold_durable",
            Self::RelayPlaced => "relay_placed",
            Self::RelayFirstByte => "relay_first_byte",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Consumer requests by endpoint and HTTP status.
    pub requests: IntCounterVec,
    pub time_to_first_token: Histogram,
    /// The first token's time by [`Phase`], one histogram per phase in
    /// [`Phase::ALL`]'s order: resolved once, not looked up per request.
    request_phase: [Histogram; Phase::ALL.len()],
    pub request_duration: Histogram,
    /// Content deltas (≈ tokens) streamed to consumers.
    pub tokens_streamed: IntCounter,
    pub receipts_settled: IntCounter,
    /// Receipts voided for a bad signature, wrong digests or a missing receipt.
    pub receipts_rejected: IntCounter,
    /// Workers that claimed more tokens than they streamed.
    pub overclaims: IntCounter,
    pub workers_online: IntGauge,
    /// Accounts with an actor now (idle ones retire).
    pub accounts_active: IntGauge,
    /// Ledger entries committed but not yet in a signed checkpoint.
    pub ledger_lag_entries: IntGauge,
    /// Records queued on the event log, not yet durable.
    pub event_log_lag_records: IntGauge,
    /// Cluster: 1 while this node leads the ledger's sequencer.
    pub sequencer_leading: IntGauge,
    /// Entries in the ledger (on a cluster: sequenced and projected).
    pub ledger_entries: IntGauge,
    /// Cluster: committed records of the ledger partitions the sequencer has
    /// not read yet.
    pub sequencer_lag_records: IntGauge,
    /// Cluster: ledger partitions whose books this node has loaded (it
    /// judges their accounts' spending).
    pub partitions_owned: IntGauge,
    /// Cluster: the ledger's partition count, so that an alert can compare
    /// the sum of `partitions_owned` with it.
    pub ledger_partitions: IntGauge,
    /// Cluster: 1 while this node projects worker history.
    pub history_projector_leading: IntGauge,
    /// Cluster: worker and job records not yet projected (measured by the
    /// projecting node; 0 elsewhere).
    pub history_lag_records: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("troop".into()), None).expect("static prefix is valid");
        // Latency buckets from 5 ms to 2 min: first tokens on a loaded GPU to long generations.
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Consumer API requests"),
            &["endpoint", "status"],
        )
        .expect("valid");
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "From request to the first byte from a worker",
            )
            .buckets(buckets.clone()),
        )
        .expect("valid");
        // 50 µs to 1 s: the phases before a first token are sub-millisecond
        // on a quiet node and grow under load.
        let request_phase = HistogramVec::new(
            HistogramOpts::new(
                "request_phase_seconds",
                "Time to first token by step: admitted, hold_judged, placed, first_byte, hold_durable",
            )
            .buckets(vec![
                0.000_05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 1.0,
            ]),
            &["phase"],
        )
        .expect("valid");
        // Every phase shown from the start, so that rates exist at once.
        let request_phase_by = Phase::ALL.map(|p| request_phase.with_label_values(&[p.label()]));
        let request_duration = Histogram::with_opts(
            HistogramOpts::new("request_duration_seconds", "From request to settlement")
                .buckets(buckets),
        )
        .expect("valid");
        let tokens_streamed = IntCounter::new(
            "tokens_streamed_total",
            "Content deltas streamed to consumers",
        )
        .expect("valid");
        let receipts_settled = IntCounter::new(
            "receipts_settled_total",
            "Holds settled with a countersigned receipt",
        )
        .expect("valid");
        let receipts_rejected = IntCounter::new(
            "receipts_rejected_total",
            "Holds voided for want of a valid receipt",
        )
        .expect("valid");
        let overclaims = IntCounter::new(
            "worker_overclaims_total",
            "Receipts claiming more tokens than were streamed",
        )
        .expect("valid");
        let workers_online = IntGauge::new("workers_online", "Connected workers").expect("valid");
        let accounts_active =
            IntGauge::new("accounts_active", "Accounts with an actor now").expect("valid");
        let ledger_lag_entries = IntGauge::new(
            "ledger_lag_entries",
            "Committed ledger entries not yet in a signed checkpoint",
        )
        .expect("valid");
        let event_log_lag_records = IntGauge::new(
            "event_log_lag_records",
            "Ledger records queued on the event log, not yet durable",
        )
        .expect("valid");
        let sequencer_leading = IntGauge::new(
            "sequencer_leading",
            "1 while this node leads the cluster's ledger sequencer",
        )
        .expect("valid");
        let ledger_entries =
            IntGauge::new("ledger_entries", "Entries in the ledger").expect("valid");
        let sequencer_lag_records = IntGauge::new(
            "sequencer_lag_records",
            "Committed records of the ledger partitions not yet read by the sequencer",
        )
        .expect("valid");
        let partitions_owned = IntGauge::new(
            "partitions_owned",
            "Ledger partitions whose accounts this node judges",
        )
        .expect("valid");
        let ledger_partitions = IntGauge::new(
            "ledger_partitions",
            "The cluster's ledger partitions (each must have one owner)",
        )
        .expect("valid");
        let history_projector_leading = IntGauge::new(
            "history_projector_leading",
            "1 while this node projects worker and job events into Postgres",
        )
        .expect("valid");
        let history_lag_records = IntGauge::new(
            "history_lag_records",
            "Worker and job records not yet projected (0 on a node that does not project)",
        )
        .expect("valid");
        for c in [
            Box::new(event_log_lag_records.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(history_projector_leading.clone()),
            Box::new(history_lag_records.clone()),
            Box::new(partitions_owned.clone()),
            Box::new(ledger_partitions.clone()),
            Box::new(sequencer_leading.clone()),
            Box::new(ledger_entries.clone()),
            Box::new(sequencer_lag_records.clone()),
            Box::new(requests.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(request_phase.clone()),
            Box::new(request_duration.clone()),
            Box::new(tokens_streamed.clone()),
            Box::new(receipts_settled.clone()),
            Box::new(receipts_rejected.clone()),
            Box::new(overclaims.clone()),
            Box::new(workers_online.clone()),
            Box::new(accounts_active.clone()),
            Box::new(ledger_lag_entries.clone()),
        ] {
            registry.register(c).expect("each metric registered once");
        }
        Self {
            registry,
            requests,
            time_to_first_token,
            request_phase: request_phase_by,
            request_duration,
            tokens_streamed,
            receipts_settled,
            receipts_rejected,
            overclaims,
            workers_online,
            accounts_active,
            ledger_lag_entries,
            event_log_lag_records,
            sequencer_leading,
            ledger_entries,
            sequencer_lag_records,
            partitions_owned,
            ledger_partitions,
            history_projector_leading,
            history_lag_records,
        }
    }

    /// Records how long `phase` of one request took.
    pub fn phase(&self, phase: Phase, took: std::time::Duration) {
        self.request_phase[phase as usize].observe(took.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::new();
        m.requests.with_label_values(&["chat", "200"]).inc();
        m.time_to_first_token.observe(0.2);
        // `phase` indexes its histograms by discriminant, in `ALL`'s order.
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            assert_eq!(phase as usize, i, "{phase:?}");
        }
        m.phase(Phase::Placed, std::time::Duration::from_micros(300));
        let text = m.render();
        assert!(
            text.contains("troop_request_phase_seconds_bucket{phase=\"placed\",le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("troop_request_phase_seconds_count{phase=\"hold_durable\"} 0"),
            "every phase is shown before its first request: {text}"
        );
        assert!(
            text.contains("troop_requests_total{endpoint=\"chat\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("troop_time_to_first_token_seconds_bucket{le=\"0.25\"} 1"));
    }
}
