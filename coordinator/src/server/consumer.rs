//! The consumer API: hold, place, stream, settle.

use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;
use troop_ledger::fold::FoldError;
use troop_schemas::sse::{Meter, Reading};
use troop_schemas::{AccountId, CreditsMicro, Digest, Event, HoldId, JobId, VoidReason, WorkerId};

use super::{AppState, commit_one, error_response, now_ms, random};
use crate::actors::books::{GetAccount, GetSchedule};
use crate::actors::registry::{Finished, JobEnd, JobSlot, Models, Place, WorkerLink};
use crate::api::openai::{ApiError, Endpoint, Validated, validate};
use crate::books::BooksError;
use crate::domain::billing::{self, Claimed, Observed};
use crate::domain::placement::NoWorker;
use crate::domain::ratelimit::Refusal;
use crate::history::WorkerEvent;

/// Output pieces buffered between a worker connection and one HTTP response.
const JOB_CHANNEL: usize = 64;
/// How long a worker has to send its receipt once its output ended.
const RECEIPT_DEADLINE: Duration = Duration::from_secs(10);

fn authenticate(req: &HttpRequest, state: &AppState) -> Result<AccountId, ApiError> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok());
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        ));
    };
    match state
        .keys
        .read()
        .expect("keys lock")
        .authenticate(token.trim())
    {
        Ok((_, account)) => Ok(account),
        Err(e) => Err(ApiError::unauthorized(format!(
            "Incorrect API key provided: {e}."
        ))),
    }
}

pub async fn models(state: web::Data<AppState>) -> HttpResponse {
    let models = state
        .registry
        .send(Models { now_ms: now_ms() })
        .await
        .unwrap_or_default();
    let schedule = state.books.send(GetSchedule).await.ok().flatten();
    let data: Vec<_> = models
        .into_iter()
        .map(|m| {
            let price = schedule.as_ref().and_then(|s| s.prices.get(&m.name));
            json!({
                "id": m.name, "object": "model", "created": 0, "owned_by": "troop",
                "workers_online": m.workers, "context_length": m.context_length,
                "price": price.map(|p| json!({"input_micro_per_1k": p.input_micro_per_1k, "output_micro_per_1k": p.output_micro_per_1k})),
            })
        })
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

pub async fn account(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let account = match authenticate(&req, &state) {
        Ok(a) => a,
        Err(e) => return error_response(&e),
    };
    let Some(view) = state.books.send(GetAccount(account)).await.ok().flatten() else {
        return error_response(&ApiError::unauthorized(
            "The key's account no longer exists.",
        ));
    };
    let holds: Vec<_> = view
        .holds
        .iter()
        .map(|(id, h)| json!({"hold": id.to_string(), "job": h.job.to_string(), "model": h.model, "amount_micro": h.amount.get(), "expires_at_ms": h.expires_at_ms}))
        .collect();
    HttpResponse::Ok().json(json!({
        "account": account.to_string(),
        "balance_micro": view.account.balance().to_string(),
        "available_micro": view.account.available().to_string(),
        "pending_micro": view.account.debits_pending.to_string(),
        "holds": holds,
    }))
}

pub async fn chat(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    handle(Endpoint::Chat, req, body, state.get_ref().clone()).await
}

pub async fn completions(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    handle(Endpoint::Completions, req, body, state.get_ref().clone()).await
}

/// Reads the body, runs the request, counts the response by status.
async fn handle(
    endpoint: Endpoint,
    req: HttpRequest,
    body: web::Payload,
    state: AppState,
) -> HttpResponse {
    let label = if endpoint == Endpoint::Chat {
        "chat"
    } else {
        "completions"
    };
    // The request id is the job id: it names the receipt, goes to the worker
    // with the job, and is on every log line of the request, here and there.
    let job = JobId(random::<16>());
    let span = tracing::info_span!("request", id = %job, endpoint = label);
    let mut response = async {
        match read_body(body, state.config.max_body_bytes).await {
            Ok(body) => complete(endpoint, req, body, state.clone(), job)
                .await
                .unwrap_or_else(|e| error_response(&e)),
            Err(e) => error_response(&e),
        }
    }
    .instrument(span)
    .await;
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&job.to_string()) {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-request-id"),
            v,
        );
    }
    state
        .metrics
        .requests
        .with_label_values(&[label, response.status().as_str()])
        .inc();
    response
}

/// Reads a request body up to `limit` bytes; past it, an OpenAI-shaped 413.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt as _;
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid("body", format!("reading the body failed: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// `GET /v1/receipts/{id}`: the countersigned receipt as logged, and its
/// inclusion proof in the signed ledger. Only the paying consumer's keys see it
/// here (the ledger itself is public).
pub async fn receipt(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let account = match authenticate(&req, &state) {
        Ok(a) => a,
        Err(e) => return error_response(&e),
    };
    let not_found = || {
        error_response(&ApiError {
            status: 404,
            ..ApiError::invalid("id", format!("No receipt {}.", id.as_str()))
        })
    };
    let Ok(job) = id.parse::<JobId>() else {
        return not_found();
    };
    let logged = match state
        .books
        .send(crate::actors::books::GetReceipt(job))
        .await
    {
        Ok(Ok(Some(l))) => l,
        Ok(Ok(None)) => return not_found(),
        Ok(Err(e)) => return error_response(&ApiError::upstream(e.to_string())),
        Err(e) => return error_response(&ApiError::upstream(e.to_string())),
    };
    let Ok(Event::HoldSettled {
        receipt,
        charged_micro,
        worker_earned_micro,
        fee_micro,
        ..
    }) = troop_schemas::decode_entry(&logged.entry)
    else {
        return error_response(&ApiError::upstream("ledger entry is not a settlement"));
    };
    if receipt.receipt.consumer != account {
        return not_found();
    }
    HttpResponse::Ok().json(json!({
        "id": job.to_string(),
        "ledger_index": logged.index,
        "receipt": receipt,
        "charged_micro": charged_micro.get(),
        "worker_earned_micro": worker_earned_micro.get(),
        "fee_micro": fee_micro.get(),
        "entry": String::from_utf8_lossy(&logged.entry),
        "tlog_proof": logged.tlog_proof,
    }))
}

/// How the worker said the job ended: still to come, or already heard.
enum End {
    Pending(oneshot::Receiver<JobEnd>),
    Heard(Option<JobEnd>),
}

/// Everything settlement needs to know about one request.
struct Job {
    state: AppState,
    /// The request's span, for the work that outlives its handler.
    span: tracing::Span,
    /// Held until the response is over.
    _in_flight: super::InFlight,
    endpoint: Endpoint,
    request: Validated,
    job: JobId,
    hold: HoldId,
    account: AccountId,
    reserved: CreditsMicro,
    request_digest: Digest,
    link: WorkerLink,
    end: End,
    started: Instant,
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

async fn void(state: &AppState, hold: HoldId, reason: VoidReason) {
    if let Err(e) = commit_one(
        state,
        Event::HoldVoided {
            hold,
            reason,
            at_ms: now_ms(),
        },
    )
    .await
    {
        tracing::error!(%hold, error = %e, "voiding a hold failed");
    }
}

async fn complete(
    endpoint: Endpoint,
    req: HttpRequest,
    body: Bytes,
    state: AppState,
    job: JobId,
) -> Result<HttpResponse, ApiError> {
    let received = Instant::now();
    let account = authenticate(&req, &state)?;
    let in_flight = super::InFlight::acquire(&state, account)
        .map_err(|refusal| {
            let limits = state.config.rate_limits;
            let why = match refusal {
                Refusal::Rate { .. } => format!(
                    "Rate limit reached for this account: {} requests per minute (burst {}). Retry after {} s.",
                    limits.requests_per_minute,
                    limits.burst,
                    refusal.retry_after_s()
                ),
                Refusal::InFlight { max } => format!(
                    "This account already has {max} requests in flight; wait for one to finish."
                ),
            };
            ApiError::rate_limited(refusal.retry_after_s(), why)
        })?;
    let request = validate(endpoint, &body, &state.config.limits())?;
    let schedule = state
        .books
        .send(GetSchedule)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::model_not_found(&request.model))?;
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
        at_ms: now,
    };
    match commit_one(&state, placed).await {
        Ok(_) => {}
        Err(BooksError::Refused(FoldError::InsufficientFunds {
            available, needed, ..
        })) => {
            return Err(ApiError::insufficient_credits(needed, available));
        }
        Err(e) => {
            return Err(ApiError::upstream(format!(
                "the books refused the hold: {e}"
            )));
        }
    }

    let body = request.engine_body.to_string();
    let request_digest = Digest::of(body.as_bytes());
    let mut exclude: Vec<WorkerId> = Vec::new();
    // Retry on another worker until the first byte; after it, never.
    for _ in 0..state.config.max_attempts.max(1) {
        let link = match state
            .registry
            .send(Place {
                model: request.model.clone(),
                exclude: exclude.clone(),
                now_ms: now_ms(),
            })
            .await
        {
            Ok(Ok(link)) => link,
            // The workers tried are gone too: busy, not unknown.
            Ok(Err(NoWorker::UnknownModel)) if !exclude.is_empty() => break,
            Ok(Err(NoWorker::UnknownModel)) => {
                void(&state, hold, VoidReason::Failed).await;
                return Err(ApiError::model_not_found(&request.model));
            }
            Ok(Err(NoWorker::NoCapacity)) | Err(_) => break,
        };
        let (data_tx, mut data_rx) = mpsc::channel::<Bytes>(JOB_CHANNEL);
        let (end_tx, mut end) = oneshot::channel();
        link.jobs.lock().expect("jobs lock").insert(
            job,
            JobSlot {
                data: data_tx,
                end: Some(end_tx),
            },
        );
        let msg = troop_schemas::protocol::CoordinatorMsg::Job {
            job,
            hold,
            consumer: account,
            model: request.model.clone(),
            path: endpoint.path().to_owned(),
            body: body.clone(),
        };
        if link.outbox.try_send(msg).is_err() {
            link.jobs.lock().expect("jobs lock").remove(&job);
            exclude.push(link.worker);
            continue;
        }
        state.worker_events.record(WorkerEvent::JobStarted {
            job,
            worker: link.worker,
            model: request.model.clone(),
            at_ms: now_ms(),
        });
        let started = Instant::now();
        let deadline = Duration::from_millis(state.config.first_byte_deadline_ms);
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
            _ = tokio::time::sleep(deadline) => None,
        };
        let Some(first) = first else {
            // Failed before its first byte: free the slot and try someone else.
            let reason = failure_reason(
                ended.take().flatten().as_ref(),
                "no output before the first-byte deadline",
            );
            state.worker_events.record(WorkerEvent::job_failed(
                job,
                link.worker,
                &reason,
                now_ms(),
            ));
            link.jobs.lock().expect("jobs lock").remove(&job);
            let _ = link
                .outbox
                .try_send(troop_schemas::protocol::CoordinatorMsg::Cancel { job });
            state.registry.do_send(Finished {
                worker: link.worker,
                tokens: 0,
                duration_ms: 0,
            });
            exclude.push(link.worker);
            continue;
        };
        state
            .metrics
            .time_to_first_token
            .observe(received.elapsed().as_secs_f64());
        let ctx = Job {
            state: state.clone(),
            span: tracing::Span::current(),
            _in_flight: in_flight,
            endpoint,
            request,
            job,
            hold,
            account,
            reserved,
            request_digest,
            link,
            end: match ended {
                Some(heard) => End::Heard(heard),
                None => End::Pending(end),
            },
            started,
        };
        return Ok(if ctx.request.stream {
            stream_response(ctx, first, data_rx)
        } else {
            whole_response(ctx, first, data_rx).await
        });
    }
    void(&state, hold, VoidReason::Failed).await;
    Err(ApiError::no_capacity(2))
}

/// The receipt's id, as consumers see it: the job id.
fn receipt_header(job: &JobId) -> (&'static str, String) {
    ("troop-receipt", job.to_string())
}

async fn whole_response(ctx: Job, first: Bytes, mut rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let mut meter = Meter::collecting();
    let mut failed = meter.feed(&first).err();
    let deadline = ctx.started + Duration::from_millis(ctx.state.config.job_deadline_ms);
    while failed.is_none() {
        match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
            Ok(Some(piece)) => failed = meter.feed(&piece).err(),
            Ok(None) => break,
            Err(_) => {
                failed = Some(troop_schemas::sse::MeterError::NotJson(
                    "job deadline passed".into(),
                ));
            }
        }
    }
    let reading = meter.finish();
    let cancelled = failed.is_some();
    let job = ctx.job;
    let (model, endpoint) = (ctx.request.model.clone(), ctx.endpoint);
    let bill = settle(ctx, reading.clone(), cancelled).await;
    if let Some(e) = failed {
        return error_response(&ApiError::upstream(format!(
            "the worker's output was unusable: {e}"
        )));
    }
    if let Some(err) = &reading.error {
        return error_response(&ApiError::upstream(err.clone()));
    }
    let (input, output) = bill.map_or((0, 0), |b| (b.input_tokens, b.output_tokens));
    let text = reading.text.unwrap_or_default();
    let choice = match endpoint {
        Endpoint::Chat if !reading.tool_calls.is_empty() => {
            // OpenAI's shape: content is null when the answer is only tool calls.
            let content = (!text.is_empty()).then_some(text);
            json!({"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": reading.tool_calls}, "finish_reason": reading.finish_reason})
        }
        Endpoint::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reading.finish_reason})
        }
        Endpoint::Completions => {
            json!({"index": 0, "text": text, "finish_reason": reading.finish_reason})
        }
    };
    let object = if endpoint == Endpoint::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    HttpResponse::Ok().insert_header(receipt_header(&job)).json(json!({
        "id": job.to_string(), "object": object, "created": now_ms() / 1000, "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output},
        "troop_receipt": job.to_string(),
    }))
}

/// Streams the worker's events to the consumer as they come, holding back the
/// final `[DONE]` to add a chunk naming the receipt. If the consumer goes away,
/// the guard cancels the job and settles what was delivered.
fn stream_response(ctx: Job, first: Bytes, rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let job = ctx.job;
    let deadline = ctx.started + Duration::from_millis(ctx.state.config.job_deadline_ms);
    let object = if ctx.endpoint == Endpoint::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    // The closing chunk carries the receipt id and, when asked for, the usage
    // the consumer is billed for (the engine's own usage chunk is dropped).
    let closing = Closing {
        job,
        object,
        model: ctx.request.model.clone(),
        include_usage: ctx.request.include_usage,
    };
    let guard = Guard {
        ctx: Some(ctx),
        meter: Some(Meter::new()),
    };
    let state = StreamState {
        guard,
        rx,
        pending: Some(first),
        events: EventSplitter::default(),
        closing: Some(closing),
        deadline,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            // The closing chunk went out: the stream is over.
            s.closing.as_ref()?;
            if let Some(piece) = s.pending.take() {
                // Whole events only, each metered before it is forwarded, so
                // that garbage stops the stream exactly where it starts.
                let mut out = Vec::new();
                for event in s.events.push(&piece) {
                    let metered = s.guard.meter.as_mut().map(|m| m.feed(&event));
                    if let Some(Err(e)) = metered {
                        let why = format!(
                            "The worker sent output that is not a valid event stream ({e}); the response ends here and only what was delivered is billed."
                        );
                        return Some((Ok(s.fail(out, &why).await), s));
                    }
                    if !is_done_or_usage(&event) {
                        out.extend_from_slice(&event);
                    }
                }
                if !out.is_empty() {
                    return Some((Ok::<Bytes, std::io::Error>(Bytes::from(out)), s));
                }
                continue;
            }
            match tokio::time::timeout_at(s.deadline.into(), s.rx.recv()).await {
                Ok(Some(piece)) => s.pending = Some(piece),
                Ok(None) => {
                    let closing = s.closing.take()?;
                    let rest = s.events.finish();
                    let mut out = Vec::new();
                    if let Some(m) = s.guard.meter.as_mut()
                        && m.feed(&rest).is_ok()
                        && !is_done_or_usage(&rest)
                    {
                        out.extend_from_slice(&rest);
                    }
                    // Settle before the final chunk: the receipt it names then exists.
                    let mut bill = None;
                    if let (Some(ctx), Some(meter)) = (s.guard.ctx.take(), s.guard.meter.take()) {
                        bill = settle(ctx, meter.finish(), false).await;
                    }
                    out.extend_from_slice(&closing.render(bill));
                    return Some((Ok(Bytes::from(out)), s));
                }
                Err(_) => {
                    let why = "The job passed its deadline; the response ends here and only what was delivered is billed.";
                    return Some((Ok(s.fail(Vec::new(), why).await), s));
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(receipt_header(&job))
        .streaming(stream)
}

struct StreamState {
    guard: Guard,
    rx: mpsc::Receiver<Bytes>,
    pending: Option<Bytes>,
    events: EventSplitter,
    closing: Option<Closing>,
    deadline: Instant,
}

impl StreamState {
    /// Ends the stream after `out` with an OpenAI-style error event: cancels
    /// the job on the worker, settles what was delivered, and closes with the
    /// receipt chunk and `[DONE]`.
    async fn fail(&mut self, mut out: Vec<u8>, why: &str) -> Bytes {
        let error = json!({"error": {"message": why, "type": "server_error", "param": null, "code": "worker_failed"}});
        out.extend_from_slice(format!("data: {error}\n\n").as_bytes());
        let mut bill = None;
        if let (Some(ctx), Some(meter)) = (self.guard.ctx.take(), self.guard.meter.take()) {
            let _ = ctx
                .link
                .outbox
                .try_send(troop_schemas::protocol::CoordinatorMsg::Cancel { job: ctx.job });
            tracing::warn!(worker = %ctx.link.worker, why, "stream failed after its first byte");
            bill = settle(ctx, meter.finish(), true).await;
        }
        if let Some(closing) = self.closing.take() {
            out.extend_from_slice(&closing.render(bill));
        }
        Bytes::from(out)
    }
}

struct Closing {
    job: JobId,
    object: &'static str,
    model: String,
    include_usage: bool,
}

impl Closing {
    fn render(&self, bill: Option<billing::Bill>) -> Bytes {
        let mut chunk = json!({"id": self.job.to_string(), "object": self.object, "created": now_ms() / 1000,
            "model": self.model, "choices": [], "troop_receipt": self.job.to_string()});
        if self.include_usage {
            let (i, o) = bill.map_or((0, 0), |b| (b.input_tokens, b.output_tokens));
            chunk["usage"] =
                json!({"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o});
        }
        Bytes::from(format!("data: {chunk}\n\ndata: [DONE]\n\n"))
    }
}

/// Forwards whole SSE events only, dropping the engine's `[DONE]` so that the
/// coordinator's closing chunk can come before it.
#[derive(Default)]
struct EventSplitter {
    buf: Vec<u8>,
}

impl EventSplitter {
    /// The events `piece` completes, each with its blank-line terminator.
    fn push(&mut self, piece: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(piece);
        let mut events = Vec::new();
        while let Some(end) = find_event_end(&self.buf) {
            events.push(self.buf.drain(..end).collect());
        }
        events
    }

    /// Whatever trails the last complete event.
    fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// `data: [DONE]`, or the engine's usage chunk (no choices, a usage object):
/// the coordinator sends its own of both.
fn is_done_or_usage(event: &[u8]) -> bool {
    let text = String::from_utf8_lossy(event);
    let Some(data) = text.trim().strip_prefix("data:").map(str::trim) else {
        return false;
    };
    if data == "[DONE]" {
        return true;
    }
    if !data.contains("\"usage\"") {
        return false;
    }
    serde_json::from_str::<serde_json::Value>(data).is_ok_and(|v| {
        v.get("usage").is_some_and(|u| !u.is_null())
            && v.get("choices")
                .and_then(|c| c.as_array())
                .is_some_and(Vec::is_empty)
    })
}

fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// Settles a streamed job exactly once: at the end of the stream, or — if the
/// consumer disconnected or the stream broke — when the response is dropped.
struct Guard {
    ctx: Option<Job>,
    meter: Option<Meter>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let (Some(ctx), Some(meter)) = (self.ctx.take(), self.meter.take()) {
            let _ = ctx
                .link
                .outbox
                .try_send(troop_schemas::protocol::CoordinatorMsg::Cancel { job: ctx.job });
            actix_web::rt::spawn(async move {
                settle(ctx, meter.finish(), true).await;
            });
        }
    }
}

/// Waits for the worker's receipt, checks it against what was streamed,
/// countersigns what the coordinator can account for, and settles or voids the
/// hold. Returns the bill when something was charged.
async fn settle(ctx: Job, reading: Reading, cancelled: bool) -> Option<billing::Bill> {
    let span = ctx.span.clone();
    settle_in_span(ctx, reading, cancelled)
        .instrument(span)
        .await
}

async fn settle_in_span(ctx: Job, reading: Reading, cancelled: bool) -> Option<billing::Bill> {
    let Job {
        state,
        request,
        job,
        hold,
        account,
        reserved,
        request_digest,
        link,
        end,
        started,
        ..
    } = ctx;
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
    link.jobs.lock().expect("jobs lock").remove(&job);
    state.registry.do_send(Finished {
        worker: link.worker,
        tokens: reading.deltas,
        duration_ms,
    });
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
                .record(WorkerEvent::job_failed(job, link.worker, &why, now_ms()));
            tracing::warn!(%job, worker = %link.worker, outcome = ?other, "no receipt; voiding the hold");
            state.metrics.receipts_rejected.inc();
            void(&state, hold, reason).await;
            return None;
        }
    };
    let mismatch = if receipt.job != job
        || receipt.hold != hold
        || receipt.consumer != account
        || receipt.model != request.model
    {
        Some("receipt names another job")
    } else if receipt.worker != link.worker {
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
        tracing::warn!(%job, worker = %link.worker, why, "receipt rejected; voiding the hold");
        state.metrics.receipts_rejected.inc();
        void(&state, hold, VoidReason::ReceiptRejected).await;
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
        tracing::warn!(%job, worker = %link.worker, claimed_out = receipt.output_tokens, billed_out = bill.output_tokens, "worker claimed more than it streamed");
    }
    if bill.output_tokens == 0 {
        void(&state, hold, VoidReason::Empty).await;
        return None;
    }
    let Some(schedule) = state.books.send(GetSchedule).await.ok().flatten() else {
        void(&state, hold, VoidReason::Failed).await;
        return None;
    };
    let signed = match troop_ledger::receipt::countersign(
        &state.coordinator_key,
        *receipt,
        worker_sig,
        bill.input_tokens,
        bill.output_tokens,
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%job, error = %e, "countersigning failed");
            void(&state, hold, VoidReason::Failed).await;
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
            tracing::error!(%job, error = %e, "pricing failed");
            void(&state, hold, VoidReason::Failed).await;
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
    match commit_one(&state, settled).await {
        Ok(_) => {
            state.metrics.receipts_settled.inc();
            Some(bill)
        }
        Err(e) => {
            tracing::error!(%job, error = %e, "settlement refused; voiding");
            void(&state, hold, VoidReason::Failed).await;
            None
        }
    }
}
