//! One actor per consumer request: the hold, placement and retries up to the
//! first byte ([`Open`]), then — once the HTTP response has streamed what the
//! worker sent — the receipt check and settlement ([`Deliver`]).
//!
//! The output itself never passes through here: [`Opened`] hands the HTTP
//! response the job's bounded channel. The session outlives its HTTP handler
//! when it must: a consumer gone mid-placement or mid-stream still gets its
//! hold settled or voided, by this actor, exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use troop_ledger::fold::Schedule;
use troop_schemas::protocol::CoordinatorMsg;
use troop_schemas::sse::{Meter, Reading};
use troop_schemas::{AccountId, CreditsMicro, Digest, Event, HoldId, JobId, VoidReason, WorkerId};

use super::account::Admission;
use super::registry::{Finished, Place, Placed};
use super::worker::{Assign, Cancel, JobEnd, JobSlot, Release, WorkerLink};
use crate::api::openai::{ApiError, Endpoint, Validated};
use crate::cluster::relay::RelayJob;
use crate::domain::billing::{self, Claimed, Observed};
use crate::domain::placement::NoWorker;
use crate::history::WorkerEvent;
use crate::metrics::Phase;
use crate::money::{MoneyError, Refusal};
use crate::server::{AppState, commit_as, now_ms, random};

/// Output pieces buffered between a worker connection and one HTTP response.
const JOB_CHANNEL: usize = 64;
/// How long a worker has to send its receipt once its output ended.
const RECEIPT_DEADLINE: Duration = Duration::from_secs(10);

pub struct Session {
    state: AppState,
    /// The request's span: settlement may run after the handler is gone.
    span: tracing::Span,
    endpoint: Endpoint,
    request: Arc<Validated>,
    job: JobId,
    account: AccountId,
    received: Instant,
    /// The account's in-flight place, given back when the session stops.
    _admission: Admission,
    /// Set once the first byte came; taken by settlement.
    open: Option<OpenJob>,
    /// The actor's own address while a step runs, so that it finishes the step
    /// even when nobody else holds its address any more.
    busy: Option<Addr<Session>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("job", &self.job).finish()
    }
}

impl Session {
    #[allow(
        clippy::too_many_arguments,
        reason = "one constructor, called once, with the request's parts"
    )]
    pub fn new(
        state: AppState,
        span: tracing::Span,
        endpoint: Endpoint,
        request: Arc<Validated>,
        job: JobId,
        account: AccountId,
        received: Instant,
        admission: Admission,
    ) -> Self {
        Self {
            state,
            span,
            endpoint,
            request,
            job,
            account,
            received,
            _admission: admission,
            open: None,
            busy: None,
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        // Opened, and nobody took the output: the consumer went away between
        // the first byte and its response. Nothing was delivered.
        if let Some(open) = self.open.take() {
            open.link.cancel(&self.state, self.job);
            let settling = settle(
                self.state.clone(),
                Arc::clone(&self.request),
                self.job,
                self.account,
                open,
                Meter::new().finish(),
                true,
            )
            .instrument(self.span.clone());
            actix::spawn(async move {
                settling.await;
            });
        }
    }
}

/// How the worker said the job ended: still to come, or already heard.
enum End {
    Pending(oneshot::Receiver<JobEnd>),
    Heard(Option<JobEnd>),
}

/// Where a job runs: on a worker connected here, or on another node's
/// through a relay (which brings its bytes and its end into the same slot).
#[derive(Debug, Clone)]
enum Served {
    Local(WorkerLink),
    Remote {
        worker: WorkerId,
        internal_url: String,
    },
}

impl Served {
    fn worker(&self) -> WorkerId {
        match self {
            Self::Local(link) => link.worker,
            Self::Remote { worker, .. } => *worker,
        }
    }

    /// Tells the worker to stop the job; its receipt still comes.
    fn cancel(&self, state: &AppState, job: JobId) {
        match self {
            Self::Local(link) => link.addr.do_send(Cancel(job)),
            Self::Remote {
                worker,
                internal_url,
            } => {
                if let Some(relay) = &state.relay {
                    relay.cancel(internal_url, *worker, job);
                }
            }
        }
    }

    /// The session is done with the job: the worker's slot is free again and
    /// its speed measured. A relayed job's serving node does both when the
    /// relay ends.
    fn release(&self, state: &AppState, job: JobId, tokens: u64, duration_ms: u64) {
        if let Self::Local(link) = self {
            link.addr.do_send(Release(job));
            state.registry.do_send(Finished {
                worker: link.worker,
                tokens,
                duration_ms,
            });
        }
    }
}

/// A job that sent its first byte: what settlement needs.
struct OpenJob {
    hold: HoldId,
    reserved: CreditsMicro,
    /// The schedule the hold was priced at: its settlement is charged at it,
    /// whatever was published meanwhile.
    schedule: Arc<Schedule>,
    request_digest: Digest,
    link: Served,
    end: End,
    started: Instant,
}

/// The first piece of output and the channel the rest comes through.
#[derive(Debug)]
pub struct Opened {
    pub first: Bytes,
    pub data: mpsc::Receiver<Bytes>,
    /// When the job went to the worker that answered: deadlines count from here.
    pub started: Instant,
}

/// Places the hold and the job, retrying on other workers until one sends
/// its first byte.
#[derive(Debug, Message)]
#[rtype(result = "Result<Opened, ApiError>")]
pub struct Open;

impl Handler<Open> for Session {
    type Result = ResponseActFuture<Self, Result<Opened, ApiError>>;
    fn handle(&mut self, _: Open, ctx: &mut Self::Context) -> Self::Result {
        self.busy = Some(ctx.address());
        let opening = open(
            self.state.clone(),
            self.endpoint,
            Arc::clone(&self.request),
            self.job,
            self.account,
            self.received,
        )
        .instrument(self.span.clone());
        Box::pin(opening.into_actor(self).map(|result, act, _| {
            act.busy = None;
            result.map(|(opened, job)| {
                act.open = Some(job);
                opened
            })
        }))
    }
}

/// The response is over: `reading` is what the coordinator forwarded, and
/// `cancelled` says it ended early (the consumer left, or the output broke),
/// so the worker is told to stop. Returns the bill when something was charged.
#[derive(Debug, Message)]
#[rtype(result = "Option<billing::Bill>")]
pub struct Deliver {
    pub reading: Reading,
    pub cancelled: bool,
}

impl Handler<Deliver> for Session {
    type Result = ResponseActFuture<Self, Option<billing::Bill>>;
    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) -> Self::Result {
        let Some(open) = self.open.take() else {
            return Box::pin(fut::ready(None));
        };
        if msg.cancelled {
            open.link.cancel(&self.state, self.job);
        }
        self.busy = Some(ctx.address());
        let settling = settle(
            self.state.clone(),
            Arc::clone(&self.request),
            self.job,
            self.account,
            open,
            msg.reading,
            msg.cancelled,
        )
        .instrument(self.span.clone());
        Box::pin(settling.into_actor(self).map(|bill, act, ctx| {
            act.busy = None;
            ctx.stop();
            bill
        }))
    }
}

/// Why a job failed, for the worker's history; `silent` when the worker said nothing.
fn failure_reason(end: Option<&JobEnd>, silent: &str) -> String {
    match end {
        Some(JobEnd::Failed { status, error }) => format!("engine answered {status}: {error}"),
        Some(JobEnd::Lost) => "connection lost".to_owned(),
        Some(JobEnd::Done { .. }) => "finished without usable output".to_owned(),
        None => silent.to_owned(),
    }
}

/// How long a hold's settlement or void is asked again while its judge
/// cannot answer (a broker or an owner restarting): the worker's pay and the
/// consumer's reserved credits ride on it.
const RESOLVE_RETRY_FOR: Duration = Duration::from_secs(60);

/// Commits `event`, which closes a hold of `account`, asking again while the
/// books cannot judge or the outcome of a try is unknown. Asking again is
/// safe: a hold closes once, and closing it again is refused as not open,
/// which after an unknown outcome means an earlier try (or the hold's expiry)
/// closed it.
async fn resolve(state: &AppState, account: AccountId, event: &Event) -> Result<(), MoneyError> {
    let deadline = tokio::time::Instant::now() + RESOLVE_RETRY_FOR;
    let mut wait = Duration::from_millis(100);
    let mut unknown_before = false;
    loop {
        match commit_as(state, account, event.clone()).await {
            Ok(_) => return Ok(()),
            Err(MoneyError::Refused(r)) if unknown_before && r.code == Refusal::HOLD_NOT_OPEN => {
                tracing::warn!("a hold closed by a try whose outcome was unknown (or expired)");
                return Ok(());
            }
            Err(e @ (MoneyError::Unavailable(_) | MoneyError::Unknown(_)))
                if tokio::time::Instant::now() + wait < deadline =>
            {
                unknown_before |= matches!(e, MoneyError::Unknown(_));
                tracing::warn!(error = %e, ?wait, "closing a hold: asking again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Voids `hold`: at once when the books answer, else asked again in the
/// background (the caller's answer does not wait for a restart).
async fn void(state: &AppState, account: AccountId, hold: HoldId, reason: VoidReason) {
    let voided = Event::HoldVoided {
        hold,
        reason,
        at_ms: now_ms(),
    };
    match commit_as(state, account, voided.clone()).await {
        Ok(_) => {}
        Err(e @ (MoneyError::Unavailable(_) | MoneyError::Unknown(_))) => {
            tracing::warn!(%hold, error = %e, "voiding a hold: asking again in the background");
            let state = state.clone();
            actix::spawn(async move {
                if let Err(e) = resolve(&state, account, &voided).await {
                    tracing::error!(%hold, error = %e, "voiding a hold failed; it expires on its own");
                }
            });
        }
        Err(e) => tracing::error!(%hold, error = %e, "voiding a hold failed"),
    }
}

/// Takes a job back from a worker before any of its output was used:
/// cancelled there, its slot freed, its place in the scheduler given back.
fn abandon(state: &AppState, link: &Served, job: JobId) {
    link.cancel(state, job);
    link.release(state, job, 0, 0);
}

async fn open(
    state: AppState,
    endpoint: Endpoint,
    request: Arc<Validated>,
    job: JobId,
    account: AccountId,
    received: Instant,
) -> Result<(Opened, OpenJob), ApiError> {
    // Genesis always publishes a schedule (empty when no price is set), so
    // none means this node has not read it yet: it is starting.
    let schedule = state.schedule.get().ok_or_else(ApiError::starting)?;
    let estimate = billing::prompt_tokens_estimate(request.prompt_bytes, request.messages);
    let reserved = billing::hold_amount(
        &schedule,
        &request.model,
        estimate,
        request.max_tokens,
        state.config.max_tokens,
    )
    .map_err(|e| match e {
        billing::BillingError::Price(_) => ApiError::model_not_found(&request.model),
        billing::BillingError::MaxTokens { .. } => ApiError::invalid("max_tokens", e.to_string()),
    })?;

    let hold = HoldId(random::<16>());
    tracing::debug!(%account, model = %request.model, %hold, "hold");
    let now = now_ms();
    let placed = Event::HoldPlaced {
        hold,
        job,
        account,
        model: request.model.clone(),
        amount_micro: reserved,
        expires_at_ms: now + state.config.hold_ttl_ms,
        schedule_version: schedule.version,
        at_ms: now,
        origin: state.origin.clone(),
    };
    // The books judge the hold at once; its record becomes durable while the
    // worker starts, and no output reaches the consumer before it is.
    let asking = Instant::now();
    state.metrics.phase(Phase::Admitted, asking - received);
    let judged = state
        .accounts
        .change(account, vec![placed])
        .await
        .and_then(|judged| {
            let verdict = judged.verdicts.into_iter().next().expect("one verdict");
            Ok(verdict.map(|_| judged.pending)?)
        });
    let mut hold_durable = match judged {
        Ok(pending) => {
            state.metrics.phase(Phase::HoldJudged, asking.elapsed());
            pending
        }
        Err(MoneyError::Refused(Refusal {
            shortfall: Some(s), ..
        })) => {
            return Err(ApiError::insufficient_credits(
                s.needed_micro,
                s.available_micro,
            ));
        }
        Err(MoneyError::Unavailable(why)) => {
            return Err(ApiError::unavailable(format!(
                "the hold could not be placed now: {why}"
            )));
        }
        // Placed or not, its judge cannot say now (an owner or the broker
        // restarting; a resend after such a try finds the hold there): it is
        // voided when the books answer, or expires, and nothing ran.
        Err(e)
            if matches!(&e, MoneyError::Unknown(_))
                || matches!(&e, MoneyError::Refused(r) if r.code == Refusal::ALREADY_EXISTS) =>
        {
            void(&state, account, hold, VoidReason::Failed).await;
            return Err(ApiError::unavailable(format!(
                "the hold could not be placed now: {e}"
            )));
        }
        Err(e) => {
            return Err(ApiError::upstream(format!(
                "the books refused the hold: {e}"
            )));
        }
    };

    let body = request.engine_body.to_string();
    let request_digest = Digest::of(body.as_bytes());
    let mut exclude: Vec<WorkerId> = Vec::new();
    let mut exclude_nodes: Vec<String> = Vec::new();
    let deadline = Duration::from_millis(state.config.first_byte_deadline_ms);
    // Retry on another worker until the first byte; after it, never.
    for _ in 0..state.config.max_attempts.max(1) {
        let placing = Instant::now();
        let placed = match state
            .registry
            .send(Place {
                model: request.model.clone(),
                exclude: exclude.clone(),
                exclude_nodes: exclude_nodes.clone(),
                relay: state.relay.is_some(),
                now_ms: now_ms(),
            })
            .await
        {
            Ok(Ok(placed)) => placed,
            // The workers tried are gone too: busy, not unknown.
            Ok(Err(NoWorker::UnknownModel)) if !exclude.is_empty() => break,
            // Priced (the hold says so) but served by no worker now.
            Ok(Err(NoWorker::UnknownModel)) => {
                void(&state, account, hold, VoidReason::Failed).await;
                return Err(ApiError::model_unavailable(&request.model, 2));
            }
            Ok(Err(NoWorker::NoCapacity)) | Err(_) => break,
        };
        let (data_tx, mut data_rx) = mpsc::channel::<Bytes>(JOB_CHANNEL);
        let (end_tx, mut end) = oneshot::channel();
        let slot = JobSlot {
            data: data_tx,
            end: end_tx,
        };
        let started = Instant::now();
        let first_byte_by = tokio::time::Instant::from_std(started) + deadline;
        let link = match placed {
            Placed::Local(link) => {
                let assign = Assign {
                    job,
                    slot,
                    msg: CoordinatorMsg::Job {
                        job,
                        hold,
                        consumer: account,
                        model: request.model.clone(),
                        path: endpoint.path().to_owned(),
                        body: body.clone(),
                    },
                };
                // An actor that is gone drops the slot: the end below says so at once.
                link.addr.do_send(assign);
                Served::Local(link)
            }
            Placed::Remote(offer) => {
                let relay = state
                    .relay
                    .as_ref()
                    .expect("offers are used only with a relay");
                let relayed = RelayJob {
                    job,
                    hold,
                    consumer: account,
                    model: request.model.clone(),
                    path: endpoint.path().to_owned(),
                    body: body.clone(),
                    exclude: exclude.clone(),
                };
                // Not taken there (no room, unreachable, too slow to say):
                // the job runs nowhere, so another node or worker may have it.
                let opened =
                    tokio::time::timeout_at(first_byte_by, relay.open(&offer, &relayed, slot));
                match opened.await {
                    Ok(Ok(worker)) => Served::Remote {
                        worker,
                        internal_url: offer.internal_url,
                    },
                    Ok(Err(e)) => {
                        tracing::info!(node = %offer.node, error = %e, "relayed job not taken");
                        exclude_nodes.push(offer.node);
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(node = %offer.node, "relayed job not taken before the first-byte deadline");
                        exclude_nodes.push(offer.node);
                        continue;
                    }
                }
            }
        };
        let handed_over = Instant::now();
        state.worker_events.record(WorkerEvent::JobStarted {
            job,
            worker: link.worker(),
            model: request.model.clone(),
            at_ms: now_ms(),
        });
        let mut ended = None;
        let first = tokio::select! {
            // Data first: a fast worker's output and its end can arrive together.
            biased;
            first = data_rx.recv() => first,
            r = &mut end => {
                // The job ended; anything it sent before is still buffered.
                ended = Some(r.ok());
                data_rx.try_recv().ok()
            }
            _ = tokio::time::sleep_until(first_byte_by) => None,
        };
        let Some(first) = first else {
            // Failed before its first byte: free the slot and try someone else.
            let reason = failure_reason(
                ended.take().flatten().as_ref(),
                "no output before the first-byte deadline",
            );
            state.worker_events.record(WorkerEvent::job_failed(
                job,
                link.worker(),
                &reason,
                now_ms(),
            ));
            abandon(&state, &link, job);
            exclude.push(link.worker());
            continue;
        };
        let first_at = Instant::now();
        state.metrics.phase(Phase::Placed, handed_over - placing);
        state
            .metrics
            .phase(Phase::FirstByte, first_at - handed_over);
        if let Some(pending) = hold_durable.take()
            && let Err(e) = pending.durable().await
        {
            // Recorded or not, the hold pays for nothing: it is voided when
            // the books can answer (a cluster's next owner of the account),
            // or expires. An embedded log that failed acknowledges nothing
            // more until a restart, which voids it.
            tracing::error!(error = %e, %hold, "the hold's write failed: nothing of this request is acknowledged");
            abandon(&state, &link, job);
            void(&state, account, hold, VoidReason::Failed).await;
            return Err(ApiError::unavailable(format!(
                "the event log could not record the hold: {e}"
            )));
        }
        state.metrics.phase(Phase::HoldDurable, first_at.elapsed());
        state
            .metrics
            .time_to_first_token
            .observe(received.elapsed().as_secs_f64());
        let open = OpenJob {
            hold,
            reserved,
            schedule: schedule.clone(),
            request_digest,
            link,
            end: match ended {
                Some(heard) => End::Heard(heard),
                None => End::Pending(end),
            },
            started,
        };
        let opened = Opened {
            first,
            data: data_rx,
            started,
        };
        return Ok((opened, open));
    }
    void(&state, account, hold, VoidReason::Failed).await;
    Err(ApiError::no_capacity(2))
}

/// Waits for the worker's receipt, checks it against what was streamed,
/// countersigns what the coordinator can account for, and settles or voids the
/// hold. Returns the bill when something was charged.
async fn settle(
    state: AppState,
    request: Arc<Validated>,
    job: JobId,
    account: AccountId,
    open: OpenJob,
    reading: Reading,
    cancelled: bool,
) -> Option<billing::Bill> {
    let OpenJob {
        hold,
        reserved,
        schedule,
        request_digest,
        link,
        end,
        started,
    } = open;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    state
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    state.metrics.tokens_streamed.inc_by(reading.deltas);
    let end = match end {
        End::Pending(rx) => tokio::time::timeout(RECEIPT_DEADLINE, rx)
            .await
            .ok()
            .and_then(Result::ok),
        End::Heard(end) => end,
    };
    link.release(&state, job, reading.deltas, duration_ms);
    let (receipt, worker_sig) = match end {
        Some(JobEnd::Done {
            receipt,
            worker_sig,
            ..
        }) => (receipt, worker_sig),
        other => {
            let reason = if reading.deltas == 0 {
                VoidReason::Failed
            } else {
                VoidReason::ReceiptRejected
            };
            let why = failure_reason(other.as_ref(), "no receipt before the deadline");
            state
                .worker_events
                .record(WorkerEvent::job_failed(job, link.worker(), &why, now_ms()));
            tracing::warn!(worker = %link.worker(), outcome = ?other, "no receipt; voiding the hold");
            state.metrics.receipts_rejected.inc();
            void(&state, account, hold, reason).await;
            return None;
        }
    };
    let mismatch = if receipt.job != job
        || receipt.hold != hold
        || receipt.consumer != account
        || receipt.model != request.model
    {
        Some("receipt names another job")
    } else if receipt.worker != link.worker() {
        Some("receipt is from another worker")
    } else if receipt.request_digest != request_digest {
        Some("request digest differs from what was sent")
    } else if !cancelled && receipt.response_digest != reading.digest {
        Some("response digest differs from what was streamed")
    } else {
        None
    };
    let signed_ok = ed25519_dalek::VerifyingKey::from_bytes(&receipt.worker_key.0)
        .ok()
        .is_some_and(|vk| {
            !vk.is_weak()
                && receipt.signing_bytes().is_ok_and(|m| {
                    vk.verify_strict(&m, &ed25519_dalek::Signature::from_bytes(&worker_sig.0))
                        .is_ok()
                })
        });
    if let Some(why) = mismatch.or((!signed_ok).then_some("bad worker signature")) {
        tracing::warn!(worker = %link.worker(), why, "receipt rejected; voiding the hold");
        state.metrics.receipts_rejected.inc();
        void(&state, account, hold, VoidReason::ReceiptRejected).await;
        return None;
    }
    let observed = Observed {
        prompt_tokens_bound: billing::prompt_tokens_bound(request.prompt_bytes, request.messages),
        deltas: reading.deltas,
        content_bytes: reading.content_bytes,
        one_token_per_delta: true,
        stopped: reading.finish_reason.as_deref() == Some("stop"),
    };
    let bill = billing::bill(
        &observed,
        &Claimed {
            input_tokens: receipt.input_tokens,
            output_tokens: receipt.output_tokens,
        },
    );
    if bill.overclaimed {
        state.metrics.overclaims.inc();
        tracing::warn!(worker = %link.worker(), claimed_out = receipt.output_tokens, billed_out = bill.output_tokens, "worker claimed more than it streamed");
    }
    if bill.output_tokens == 0 {
        void(&state, account, hold, VoidReason::Empty).await;
        return None;
    }
    let signed = match troop_ledger::receipt::countersign(
        &state.coordinator_key,
        *receipt,
        worker_sig,
        bill.input_tokens,
        bill.output_tokens,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "countersigning failed");
            void(&state, account, hold, VoidReason::Failed).await;
            return None;
        }
    };
    let charge = match schedule.charge(
        &request.model,
        bill.input_tokens,
        bill.output_tokens,
        reserved,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "pricing failed");
            void(&state, account, hold, VoidReason::Failed).await;
            return None;
        }
    };
    let m = |v: u64| CreditsMicro::new(v).unwrap_or(CreditsMicro::MAX);
    let settled = Event::HoldSettled {
        hold,
        receipt: signed,
        charged_micro: m(charge.charged),
        worker_earned_micro: m(charge.earned),
        fee_micro: m(charge.fee),
        at_ms: now_ms(),
    };
    // A worker registered a moment ago in another partition may not have
    // reached the consumer's judge yet: the settlement waits for it.
    let settlement = crate::money::until_known(crate::money::Refusal::UNKNOWN_WORKER, || {
        resolve(&state, account, &settled)
    });
    match settlement.await {
        Ok(_) => {
            state.metrics.receipts_settled.inc();
            Some(bill)
        }
        Err(e) => {
            tracing::error!(error = %e, "settlement refused; voiding");
            void(&state, account, hold, VoidReason::Failed).await;
            None
        }
    }
}
