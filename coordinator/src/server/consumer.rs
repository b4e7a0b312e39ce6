//! The consumer API over HTTP. Each completion request gets a
//! [`Session`] actor (hold, placement, retries, settlement); the response
//! here streams the job's output from its bounded channel, meters it, and
//! hands the reading back to the session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor as _, Addr};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::Instrument as _;
use troop_schemas::sse::{Meter, Reading};
use troop_schemas::{AccountId, Event, JobId};

use super::{AppState, error_response, now_ms, random};
use crate::actors::registry::Models;
use crate::actors::session::{Deliver, Open, Session};
use crate::api::openai::{ApiError, Endpoint, Validated, validate};
use crate::domain::billing;
use crate::domain::ratelimit::Refusal;
use crate::reads::ReadError;

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
    let schedule = state.schedule.get();
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
    let view = match state.reads.account(account).await {
        Ok(Some(view)) => view,
        Ok(None) => {
            return error_response(&ApiError::unauthorized(
                "The key's account no longer exists.",
            ));
        }
        Err(e) => return error_response(&ApiError::unavailable(e.to_string())),
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
    let logged = match state.reads.receipt(job).await {
        Ok(Some(l)) => l,
        Ok(None) => return not_found(),
        Err(e @ ReadError::Unavailable(_)) => {
            return error_response(&ApiError::unavailable(e.to_string()));
        }
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

async fn complete(
    endpoint: Endpoint,
    req: HttpRequest,
    body: Bytes,
    state: AppState,
    job: JobId,
) -> Result<HttpResponse, ApiError> {
    let received = Instant::now();
    let account = authenticate(&req, &state)?;
    let admission = state
        .accounts
        .admit(account, now_ms())
        .await
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
    let request = Arc::new(validate(endpoint, &body, &state.config.limits())?);
    let session = Session::new(
        state.clone(),
        tracing::Span::current(),
        endpoint,
        Arc::clone(&request),
        job,
        account,
        received,
        admission,
    )
    .start();
    let opened = session
        .send(Open)
        .await
        .map_err(|e| ApiError::upstream(format!("the request's session stopped: {e}")))??;
    let deadline = opened.started + Duration::from_millis(state.config.job_deadline_ms);
    let ctx = Delivery {
        session,
        endpoint,
        request,
        job,
        deadline,
    };
    Ok(if ctx.request.stream {
        stream_response(ctx, opened.first, opened.data)
    } else {
        whole_response(ctx, opened.first, opened.data).await
    })
}

/// What the response needs to deliver a job's output and hand it back to its session.
struct Delivery {
    session: Addr<Session>,
    endpoint: Endpoint,
    request: Arc<Validated>,
    job: JobId,
    deadline: Instant,
}

/// Hands the session what was forwarded; it settles and says what was billed.
async fn deliver(
    session: &Addr<Session>,
    reading: Reading,
    cancelled: bool,
) -> Option<billing::Bill> {
    session
        .send(Deliver { reading, cancelled })
        .await
        .ok()
        .flatten()
}

/// The receipt's id, as consumers see it: the job id.
fn receipt_header(job: &JobId) -> (&'static str, String) {
    ("troop-receipt", job.to_string())
}

async fn whole_response(
    ctx: Delivery,
    first: Bytes,
    mut rx: mpsc::Receiver<Bytes>,
) -> HttpResponse {
    let mut meter = Meter::collecting();
    let mut failed = meter.feed(&first).err();
    let deadline = tokio::time::sleep_until(ctx.deadline.into());
    tokio::pin!(deadline);
    while failed.is_none() {
        let recv = tokio::select! {
            biased;
            () = &mut deadline => Err(()),
            r = rx.recv() => Ok(r),
        };
        match recv {
            Ok(Some(piece)) => failed = meter.feed(&piece).err(),
            Ok(None) => break,
            Err(()) => {
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
    let bill = deliver(&ctx.session, reading.clone(), cancelled).await;
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
fn stream_response(ctx: Delivery, first: Bytes, rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let job = ctx.job;
    let deadline = ctx.deadline;
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
        session: ctx.session,
        meter: Some(Meter::new()),
    };
    let state = StreamState {
        guard,
        rx,
        pending: Some(first),
        events: EventSplitter::default(),
        closing: Some(closing),
        // One timer for the whole stream, not one per token.
        deadline: Box::pin(tokio::time::sleep_until(deadline.into())),
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            // The closing chunk went out: the stream is over.
            s.closing.as_ref()?;
            if let Some(piece) = s.pending.take() {
                // Whole events only, each metered before it is forwarded, so
                // that garbage stops the stream exactly where it starts. What
                // else is already queued goes out in the same write: a busy
                // coordinator makes fewer, larger writes instead of falling
                // further behind.
                let mut out = Forward::default();
                let mut next = Some(piece);
                while let Some(piece) = next {
                    let meter = s.guard.meter.as_mut().expect("metered until it ends");
                    if let Err(e) = s.events.push(piece, meter, &mut out) {
                        let why = format!(
                            "The worker sent output that is not a valid event stream ({e}); the response ends here and only what was delivered is billed."
                        );
                        return Some((Ok(s.fail(out.into_vec(), &why).await), s));
                    }
                    next = s.rx.try_recv().ok();
                }
                match out {
                    Forward::Nothing => continue,
                    out => return Some((Ok::<Bytes, std::io::Error>(out.into_bytes()), s)),
                }
            }
            // The deadline first: a worker that streams forever is cut too.
            let recv = tokio::select! {
                biased;
                () = s.deadline.as_mut() => Err(()),
                r = s.rx.recv() => Ok(r),
            };
            match recv {
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
                    let bill = s.guard.deliver(false).await;
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
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl StreamState {
    /// Ends the stream after `out` with an OpenAI-style error event: cancels
    /// the job on the worker, settles what was delivered, and closes with the
    /// receipt chunk and `[DONE]`.
    async fn fail(&mut self, mut out: Vec<u8>, why: &str) -> Bytes {
        let error = json!({"error": {"message": why, "type": "server_error", "param": null, "code": "worker_failed"}});
        out.extend_from_slice(format!("data: {error}\n\n").as_bytes());
        tracing::warn!(why, "stream failed after its first byte");
        let bill = self.guard.deliver(true).await;
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
    /// An event begun in an earlier piece.
    buf: Vec<u8>,
}

/// What goes to the consumer in one write. A piece that is whole events, all
/// forwarded, is passed on as it came (no copy): the usual case, since agents
/// send whole events.
#[derive(Default)]
enum Forward {
    #[default]
    Nothing,
    Piece(Bytes),
    Copied(Vec<u8>),
}

impl Forward {
    fn extend(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self {
            Forward::Nothing => *self = Forward::Copied(bytes.to_vec()),
            Forward::Piece(p) => {
                let mut v = Vec::with_capacity(p.len() + bytes.len());
                v.extend_from_slice(p);
                v.extend_from_slice(bytes);
                *self = Forward::Copied(v);
            }
            Forward::Copied(v) => v.extend_from_slice(bytes),
        }
    }

    fn into_vec(self) -> Vec<u8> {
        match self {
            Forward::Nothing => Vec::new(),
            Forward::Piece(p) => p.to_vec(),
            Forward::Copied(v) => v,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Forward::Nothing => Bytes::new(),
            Forward::Piece(p) => p,
            Forward::Copied(v) => Bytes::from(v),
        }
    }
}

impl EventSplitter {
    /// Meters each event `piece` completes and adds those to forward to `out`.
    fn push(
        &mut self,
        piece: Bytes,
        meter: &mut Meter,
        out: &mut Forward,
    ) -> Result<(), troop_schemas::sse::MeterError> {
        if self.buf.is_empty() {
            // While every event so far is forwarded, `piece[..done]` is
            // owed to `out` and not yet copied.
            let mut done = 0;
            let mut owed = true;
            while let Some(end) = find_event_end(&piece[done..]) {
                let event = &piece[done..done + end];
                if let Err(e) = meter.feed(event) {
                    if owed {
                        out.extend(&piece[..done]);
                    }
                    return Err(e);
                }
                if is_done_or_usage(event) {
                    if owed {
                        out.extend(&piece[..done]);
                        owed = false;
                    }
                } else if !owed {
                    out.extend(event);
                }
                done += end;
            }
            if owed && done == piece.len() && matches!(out, Forward::Nothing) {
                *out = Forward::Piece(piece);
                return Ok(());
            }
            if owed {
                out.extend(&piece[..done]);
            }
            self.buf.extend_from_slice(&piece[done..]);
            return Ok(());
        }
        self.buf.extend_from_slice(&piece);
        let mut start = 0;
        while let Some(end) = find_event_end(&self.buf[start..]) {
            let event = &self.buf[start..start + end];
            meter.feed(event)?;
            if !is_done_or_usage(event) {
                out.extend(event);
            }
            start += end;
        }
        self.buf.drain(..start);
        Ok(())
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

/// Hands a streamed job back to its session exactly once: at the end of the
/// stream, or — if the consumer disconnected or the stream broke — when the
/// response is dropped (the session then cancels the job on the worker and
/// settles what was delivered).
struct Guard {
    session: Addr<Session>,
    meter: Option<Meter>,
}

impl Guard {
    async fn deliver(&mut self, cancelled: bool) -> Option<billing::Bill> {
        let meter = self.meter.take()?;
        deliver(&self.session, meter.finish(), cancelled).await
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            self.session.do_send(Deliver {
                reading: meter.finish(),
                cancelled: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    const C2: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n";
    const USAGE: &[u8] = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &[u8] = b"data: [DONE]\n\n";

    fn push_all(pieces: &[&[u8]]) -> (Vec<u8>, Meter, Result<(), troop_schemas::sse::MeterError>) {
        let mut splitter = EventSplitter::default();
        let mut meter = Meter::new();
        let mut out = Forward::default();
        for p in pieces {
            if let Err(e) = splitter.push(Bytes::copy_from_slice(p), &mut meter, &mut out) {
                return (out.into_vec(), meter, Err(e));
            }
        }
        (out.into_vec(), meter, Ok(()))
    }

    #[test]
    fn whole_events_pass_without_a_copy() {
        let piece = Bytes::from([C1, C2].concat());
        let mut out = Forward::default();
        let mut meter = Meter::new();
        EventSplitter::default()
            .push(piece.clone(), &mut meter, &mut out)
            .expect("valid");
        let Forward::Piece(forwarded) = out else {
            panic!("copied")
        };
        assert_eq!(forwarded.as_ptr(), piece.as_ptr(), "the same buffer");
        assert_eq!(meter.finish().deltas, 2);
    }

    #[test]
    fn engine_done_and_usage_are_dropped_wherever_they_are() {
        let (out, meter, r) = push_all(&[&[C1, USAGE, C2, DONE].concat()]);
        r.expect("valid");
        assert_eq!(out, [C1, C2].concat());
        assert_eq!(meter.finish().deltas, 2);
    }

    #[test]
    fn events_split_across_pieces_are_forwarded_whole() {
        let all = [C1, C2].concat();
        let (first, second) = all.split_at(C1.len() + 7);
        let (out, meter, r) = push_all(&[first, second]);
        r.expect("valid");
        assert_eq!(out, all);
        assert_eq!(meter.finish().deltas, 2);
        let (out, _, _) = push_all(&[first]);
        assert_eq!(out, C1, "only whole events go out");
    }

    #[test]
    fn garbage_stops_after_what_came_before_it() {
        let (out, _, r) = push_all(&[&[C1, b"data: \xff\n\n", C2].concat()]);
        assert!(r.is_err());
        assert_eq!(out, C1);
    }
}
