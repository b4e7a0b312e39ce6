//! The internal API between nodes (CLUSTER.md, "Requests on another node"):
//! a request may arrive on any node, and its account's balance changes are
//! judged by the account's owner. The node asks the owner of the account's
//! partition (from `partition_owners` and `nodes`) over HTTP; the owner's
//! partition is the one serialization point of the account's money, so the
//! same key hammering every node at once cannot overdraw it.
//!
//! Every call carries the cluster's shared secret (compared in constant
//! time): whoever can call it can move money. The owner answers a change in
//! two lines: its verdicts as soon as it has judged, then whether the accepted
//! events are durable. The caller starts the job on the first line and
//! releases nothing the change pays for before the second says durable, so
//! the broker's acknowledgement overlaps the worker's start, as the embedded
//! log's fsync does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt as _;
use subtle::ConstantTimeEq as _;
use troop_schemas::Event;

use crate::actors::registry::ListWorkers;
use crate::api::openai::ApiError;
use crate::cluster::owned::OwnedBooks;
use crate::cluster::owner::{OwnerError, partition_of_home};
use crate::cluster::relay::{self, RelayHere};
use crate::directory::Directory;
use crate::eventlog::{EventLogError, Pending};
use crate::money::{Home, Judged, Money, MoneyError, Refusal};
use crate::server::error_response;

/// Events in one change: a request's hold, settlement or void is one or two.
pub const MAX_EVENTS_PER_CHANGE: usize = 256;
/// Largest change body accepted: a settlement with its receipt is a few KB.
pub const MAX_CHANGE_BYTES: usize = 1 << 20;
/// Times a change is sent again after the owner moved or was not ready.
const ATTEMPTS: u32 = 5;
/// The longest a node waits for one internal call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest cluster secret accepted.
pub const MIN_SECRET_CHARS: usize = 16;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ChangeRequest {
    pub events: Vec<Event>,
}

/// The owner's verdict on one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Accepted and durable: its record number in the partition.
    Record(u64),
    /// Refused; its code says why in a word (`insufficient_funds`, …).
    Refused(Refusal),
}

/// The first line of the owner's answer to a change.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ChangeResponse {
    pub verdicts: Vec<Verdict>,
}

/// The second line: the accepted events' write.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Written {
    Durable,
    /// Not durable, and whether the broker has it is unknown.
    Failed(String),
}

/// The longest second line read: `Written` with a broker's error message.
const MAX_WRITTEN_BYTES: usize = 16 << 10;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct AppendRequest {
    pub records: Vec<Directory>,
}

/// Directory records appended and durable: the first one's record number.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct AppendResponse {
    pub first_record: u64,
}

/// An owner's refusal of one event, as the caller answers its client.
pub fn refusal(e: &OwnerError) -> Refusal {
    match e {
        OwnerError::Refused(f) => Refusal::of(f),
        OwnerError::NotHere { .. } => Refusal::new("not_here", e.to_string()),
        OwnerError::Unjudgeable(_) => Refusal::new("unjudgeable", e.to_string()),
        OwnerError::Encoding(_) => Refusal::new("encoding", e.to_string()),
        _ => Refusal::new("failed", e.to_string()),
    }
}

/// The cluster's shared secret, kept as its hash (fixed length, so the
/// comparison's time says nothing about it).
#[derive(Clone)]
pub struct Secret(blake3::Hash);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Refuses a secret shorter than [`MIN_SECRET_CHARS`]: it would be guessable.
    pub fn new(secret: &str) -> Result<Self, InternalError> {
        if secret.chars().count() < MIN_SECRET_CHARS {
            return Err(InternalError::WeakSecret);
        }
        Ok(Self(blake3::hash(secret.as_bytes())))
    }

    fn admits(&self, presented: &str) -> bool {
        let presented = blake3::hash(presented.as_bytes());
        bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// What the internal routes need.
#[derive(Debug, Clone)]
pub struct Internal {
    pub owned: Arc<OwnedBooks>,
    pub secret: Secret,
    /// This node's workers, for jobs relayed from other nodes (`None`: it
    /// serves none).
    pub relay: Option<RelayHere>,
}

/// Mounts `/internal/v1/` on an actix-web app.
pub fn routes(internal: Internal) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let max_job_bytes = internal
            .relay
            .as_ref()
            .map_or(MAX_CHANGE_BYTES, |r| r.max_job_bytes);
        cfg.app_data(web::Data::new(internal)).service(
            web::scope("/internal/v1")
                .app_data(web::PayloadConfig::new(MAX_CHANGE_BYTES))
                .service(
                    web::resource("/jobs")
                        .app_data(web::PayloadConfig::new(max_job_bytes))
                        .route(web::post().to(relay::job_handler)),
                )
                .route("/jobs/cancel", web::post().to(relay::cancel_handler))
                .route("/workers", web::get().to(workers_handler))
                .route(
                    "/ledger/{partition}/changes",
                    web::post().to(change_handler),
                )
                .route(
                    "/ledger/{partition}/directory",
                    web::post().to(append_handler),
                ),
        );
    }
}

pub(crate) fn internal_error(
    status: u16,
    code: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        status,
        kind: "internal_error",
        code: Some(code),
        param: None,
        message: message.into(),
        retry_after_s: (status == 503).then_some(1),
    }
}

/// Refuses a call that does not carry the cluster's secret.
fn authorized(internal: &Internal, request: &HttpRequest) -> Result<(), ApiError> {
    let presented = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !internal.secret.admits(presented) {
        return Err(ApiError::unauthorized(
            "This is a cluster node's internal API: a node's secret is required.",
        ));
    }
    Ok(())
}

/// The body of an internal call from a node holding the cluster's secret.
pub(crate) fn admitted<T: serde::de::DeserializeOwned>(
    internal: &Internal,
    request: &HttpRequest,
    body: &[u8],
) -> Result<T, ApiError> {
    authorized(internal, request)?;
    serde_json::from_slice(body).map_err(ApiError::malformed_json)
}

/// `GET /internal/v1/workers`: this node's connected workers, as its
/// registry sees them now (no history: the asking node reads that from the
/// shared projection for all workers at once).
async fn workers_handler(internal: web::Data<Internal>, request: HttpRequest) -> HttpResponse {
    if let Err(refused) = authorized(&internal, &request) {
        return error_response(&refused);
    }
    let workers = match &internal.relay {
        Some(here) => match here.registry.send(ListWorkers).await {
            Ok(workers) => workers,
            Err(e) => {
                return error_response(&internal_error(503, "not_ready", e.to_string()));
            }
        },
        None => Vec::new(),
    };
    HttpResponse::Ok().json(crate::cluster::peers::NodeWorkers { workers })
}

fn count_error(field: &'static str) -> HttpResponse {
    error_response(&ApiError::invalid(
        field,
        format!("a call holds 1 to {MAX_EVENTS_PER_CHANGE} {field}"),
    ))
}

async fn change_handler(
    internal: web::Data<Internal>,
    partition: web::Path<i32>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let change: ChangeRequest = match admitted(&internal, &request, &body) {
        Ok(c) => c,
        Err(refused) => return error_response(&refused),
    };
    if change.events.is_empty() || change.events.len() > MAX_EVENTS_PER_CHANGE {
        return count_error("events");
    }
    let (verdicts, pending) =
        match judge_here(&internal.owned, partition.into_inner(), &change.events).await {
            Ok(judged) => judged,
            Err(refused) => return answer(Err::<(), _>(refused)),
        };
    let written = async move {
        let written = match pending {
            None => Written::Durable,
            Some(pending) => match pending.durable().await {
                Ok(_) => Written::Durable,
                Err(e) => Written::Failed(e.to_string()),
            },
        };
        Ok::<_, std::convert::Infallible>(json_line(&written))
    };
    let verdicts = json_line(&ChangeResponse { verdicts });
    HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .streaming(
            futures_util::stream::once(std::future::ready(Ok(verdicts)))
                .chain(futures_util::stream::once(written)),
        )
}

fn json_line(value: &impl serde::Serialize) -> web::Bytes {
    let mut line = serde_json::to_vec(value).expect("answers serialize");
    line.push(b'\n');
    line.into()
}

async fn append_handler(
    internal: web::Data<Internal>,
    partition: web::Path<i32>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let append: AppendRequest = match admitted(&internal, &request, &body) {
        Ok(a) => a,
        Err(refused) => return error_response(&refused),
    };
    if append.records.is_empty() || append.records.len() > MAX_EVENTS_PER_CHANGE {
        return count_error("records");
    }
    let appended = append_here(&internal.owned, partition.into_inner(), &append.records).await;
    answer(appended.map(|first_record| AppendResponse { first_record }))
}

/// The owner's answer: 200 once durable, or why not in a status the caller
/// knows how to take.
fn answer(outcome: Result<impl serde::Serialize, Here>) -> HttpResponse {
    match outcome {
        Ok(body) => HttpResponse::Ok().json(body),
        // 421: the caller's map of owners is stale; it looks again.
        Err(Here::NotOwned(why)) => error_response(&internal_error(421, "not_owner", why)),
        Err(Here::Unavailable(why)) => {
            error_response(&internal_error(503, "owner_unavailable", why))
        }
        // Not acknowledged, and not to be sent again: it could apply twice.
        Err(Here::Unknown(why)) => error_response(&internal_error(
            500,
            "not_durable",
            format!("the outcome is unknown: {why}"),
        )),
    }
}

/// Why a change could not be judged on this node.
#[derive(Debug)]
enum Here {
    /// Another node owns the partition (or none has loaded it yet).
    NotOwned(String),
    /// Nothing was queued: the change may be sent again.
    Unavailable(String),
    /// Accepted by the fold, and whether the broker has it is unknown.
    Unknown(String),
}

/// The verdicts on a change, and the write that makes the accepted events
/// durable (none when nothing was accepted).
pub type Judgement = (Vec<Verdict>, Option<Pending>);

/// Judges `events` in `partition` on this node, which must own it; the
/// accepted ones are queued on its log, durable once the pending write is.
async fn judge_here(
    owned: &OwnedBooks,
    partition: i32,
    events: &[Event],
) -> Result<Judgement, Here> {
    let (verdicts, pending) = match owned.submit(partition, events).await {
        Ok(submitted) => submitted,
        Err(e @ OwnerError::NotOwned(_)) => return Err(Here::NotOwned(e.to_string())),
        Err(e) => return Err(Here::Unavailable(e.to_string())),
    };
    let verdicts = verdicts
        .into_iter()
        .map(|v| match v {
            Ok(record) => Verdict::Record(record),
            Err(e) => Verdict::Refused(refusal(&e)),
        })
        .collect();
    Ok((verdicts, pending))
}

/// Appends directory records to `partition` on this node, which must own
/// it, and waits until they are durable.
async fn append_here(
    owned: &OwnedBooks,
    partition: i32,
    records: &[Directory],
) -> Result<u64, Here> {
    let pending = match owned.append(partition, records).await {
        Ok(pending) => pending,
        Err(e @ OwnerError::NotOwned(_)) => return Err(Here::NotOwned(e.to_string())),
        Err(e) => return Err(Here::Unavailable(e.to_string())),
    };
    pending
        .durable()
        .await
        .map_err(|e| Here::Unknown(e.to_string()))
}

/// A node's door to the ledger's money, the cluster's [`Money`] adapter: a
/// change is judged here when this node owns its partition, and by the owner
/// over the internal API otherwise. Verdicts come back as soon as they are
/// judged, with the write that makes them durable.
#[derive(Debug, Clone)]
pub struct ClusterBooks {
    pub owned: Arc<OwnedBooks>,
    remote: Arc<RemoteOwners>,
    postgres: Arc<tokio_postgres::Client>,
    partitions: u32,
}

impl ClusterBooks {
    /// `partitions`: the ledger topic's, as `migrate` made it.
    pub fn new(
        owned: Arc<OwnedBooks>,
        secret: &str,
        postgres: tokio_postgres::Client,
        partitions: u32,
    ) -> Self {
        Self {
            owned,
            remote: Arc::new(RemoteOwners::new(secret)),
            postgres: Arc::new(postgres),
            partitions,
        }
    }

    /// The verdicts on `events`, changes of accounts in `partition`, and the
    /// write that makes the accepted ones durable.
    pub async fn judge_in(
        &self,
        partition: i32,
        events: &[Event],
    ) -> Result<Judgement, InternalError> {
        match judge_here(&self.owned, partition, events).await {
            Ok(judged) => Ok(judged),
            Err(Here::NotOwned(_)) => self.remote.change(&self.postgres, partition, events).await,
            Err(Here::Unavailable(why)) => Err(InternalError::Unavailable(partition, why)),
            Err(Here::Unknown(_)) => Err(InternalError::Unknown(partition)),
        }
    }

    /// The verdicts on `events` once the accepted ones are durable.
    pub async fn change_in(
        &self,
        partition: i32,
        events: &[Event],
    ) -> Result<Vec<Verdict>, InternalError> {
        let (verdicts, pending) = self.judge_in(partition, events).await?;
        if let Some(pending) = pending {
            pending
                .durable()
                .await
                .map_err(|_| InternalError::Unknown(partition))?;
        }
        Ok(verdicts)
    }

    /// Directory records appended to `partition`: the first one's number.
    pub async fn append_in(
        &self,
        partition: i32,
        records: &[Directory],
    ) -> Result<u64, InternalError> {
        match append_here(&self.owned, partition, records).await {
            Ok(first) => Ok(first),
            Err(Here::NotOwned(_)) => {
                let body = AppendRequest {
                    records: records.to_vec(),
                };
                let answer: AppendResponse = self
                    .remote
                    .call(&self.postgres, partition, "directory", &body)
                    .await?;
                Ok(answer.first_record)
            }
            Err(Here::Unavailable(why)) => Err(InternalError::Unavailable(partition, why)),
            Err(Here::Unknown(_)) => Err(InternalError::Unknown(partition)),
        }
    }

    fn partition(&self, home: Home) -> i32 {
        i32::try_from(partition_of_home(home, self.partitions))
            .expect("partition numbers fit Kafka's i32")
    }
}

impl Money for ClusterBooks {
    fn change(
        &self,
        home: Home,
        events: Vec<Event>,
    ) -> futures_util::future::BoxFuture<'static, Result<Judged, MoneyError>> {
        let books = self.clone();
        let partition = self.partition(home);
        Box::pin(async move {
            let (verdicts, pending) = books
                .judge_in(partition, &events)
                .await
                .map_err(money_error)?;
            if verdicts.len() != events.len() {
                return Err(MoneyError::Unknown(format!(
                    "the owner of partition {partition} answered {} verdicts for {} events",
                    verdicts.len(),
                    events.len()
                )));
            }
            Ok(Judged {
                verdicts: verdicts
                    .into_iter()
                    .map(|v| match v {
                        Verdict::Record(n) => Ok(n),
                        Verdict::Refused(r) => Err(r),
                    })
                    .collect(),
                pending,
            })
        })
    }

    fn append(
        &self,
        home: Home,
        records: Vec<Directory>,
    ) -> futures_util::future::BoxFuture<'static, Result<(), MoneyError>> {
        let books = self.clone();
        let partition = self.partition(home);
        Box::pin(async move {
            books
                .append_in(partition, &records)
                .await
                .map(|_| ())
                .map_err(money_error)
        })
    }
}

/// Whether a change that failed may be sent again ([`MoneyError::Unavailable`])
/// or may have been judged ([`MoneyError::Unknown`]): only what surely never
/// reached a judge is safe to resend.
fn money_error(e: InternalError) -> MoneyError {
    match &e {
        // Surely not judged: sending it again is safe.
        InternalError::NoOwner(_)
        | InternalError::Postgres(_)
        | InternalError::Unavailable(..)
        | InternalError::WeakSecret => MoneyError::Unavailable(e.to_string()),
        InternalError::Call { source, .. } if source.is_connect() => {
            MoneyError::Unavailable(e.to_string())
        }
        // Refused before judging (421, 503 after every attempt,
        // or a request the owner would not take).
        InternalError::Owner { status, .. } if *status != 500 => {
            MoneyError::Unavailable(e.to_string())
        }
        // A 500 (accepted, its write failed), a timeout, or a
        // call cut after it was sent: the owner may have it.
        _ => MoneyError::Unknown(e.to_string()),
    }
}

/// The lines of an owner's answer (JSON, one per line), read one at a time.
struct Lines {
    partition: i32,
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Lines {
    async fn next<T: serde::de::DeserializeOwned>(
        &mut self,
        max_bytes: usize,
    ) -> Result<T, InternalError> {
        let partition = self.partition;
        let garbled = |why: String| InternalError::Garbled { partition, why };
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return serde_json::from_slice(&line[..end]).map_err(|e| garbled(e.to_string()));
            }
            if self.buffer.len() > max_bytes {
                return Err(garbled(format!("a line longer than {max_bytes} bytes")));
            }
            let chunk = self
                .response
                .chunk()
                .await
                .map_err(|source| InternalError::Call { partition, source })?;
            match chunk {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => return Err(garbled("the answer ended before its line".into())),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no node owns ledger partition {0} now")]
    NoOwner(i32),
    #[error("the owner of partition {partition} answered {status}: {body}")]
    Owner {
        partition: i32,
        status: u16,
        body: String,
    },
    #[error("calling the owner of partition {partition}: {source}")]
    Call {
        partition: i32,
        source: reqwest::Error,
    },
    #[error(
        "the owner of partition {0} did not answer in time; the change may or may not have been made"
    )]
    Unknown(i32),
    #[error("partition {0} cannot judge now: {1}")]
    Unavailable(i32, String),
    /// The owner answered 200 and then something unreadable: it may have
    /// judged the change.
    #[error("the owner of partition {partition} answered garbled: {why}")]
    Garbled { partition: i32, why: String },
    #[error("the cluster secret must be at least {MIN_SECRET_CHARS} characters")]
    WeakSecret,
}

/// Sends balance changes to whichever node owns their partition.
#[derive(Debug)]
pub struct RemoteOwners {
    http: reqwest::Client,
    bearer: String,
    /// partition → owner's internal URL, as last read; refreshed when a call
    /// finds it stale.
    owners: Mutex<BTreeMap<i32, String>>,
}

impl RemoteOwners {
    pub fn new(secret: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .build()
                .expect("an HTTP client with a timeout"),
            bearer: format!("Bearer {secret}"),
            owners: Mutex::default(),
        }
    }

    async fn refresh(&self, client: &tokio_postgres::Client) -> Result<(), InternalError> {
        let rows = client
            .query(
                "select o.partition_id, n.internal_url from partition_owners o join nodes n on n.node = o.node",
                &[],
            )
            .await?;
        *self
            .owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(())
    }

    fn owner(&self, partition: i32) -> Option<String> {
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&partition)
            .cloned()
    }

    /// The owner's verdicts on `events` in `partition`. Sent again only when
    /// it surely was not judged (no owner known, the owner moved, it was not
    /// ready, or the connection was refused): a change sent twice could be
    /// judged twice.
    ///
    /// The verdicts come back as soon as the owner has judged; the returned
    /// write resolves when its second line says whether they are durable.
    pub async fn change(
        &self,
        client: &tokio_postgres::Client,
        partition: i32,
        events: &[Event],
    ) -> Result<Judgement, InternalError> {
        let body = ChangeRequest {
            events: events.to_vec(),
        };
        let response = self.post(client, partition, "changes", &body).await?;
        let mut lines = Lines {
            partition,
            response,
            buffer: Vec::new(),
        };
        let ChangeResponse { verdicts } = lines.next(MAX_CHANGE_BYTES).await?;
        if verdicts.len() != events.len() {
            return Err(InternalError::Garbled {
                partition,
                why: format!("{} verdicts for {} events", verdicts.len(), events.len()),
            });
        }
        let accepted: Vec<u64> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::Record(n) => Some(*n),
                Verdict::Refused(_) => None,
            })
            .collect();
        let Some(&first) = accepted.first() else {
            return Ok((verdicts, None));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Read on its own, so that a caller who never waits for it (its
        // request ended) still lets the connection finish.
        tokio::spawn(async move {
            let written = match lines.next::<Written>(MAX_WRITTEN_BYTES).await {
                Ok(Written::Durable) => Ok(first),
                Ok(Written::Failed(why)) => Err(EventLogError::Broker(why)),
                Err(e) => Err(EventLogError::Broker(e.to_string())),
            };
            let read_all = written.is_ok() && lines.buffer.is_empty();
            let _ = tx.send(written);
            if read_all {
                super::finish(&mut lines.response).await;
            }
        });
        let count = u64::try_from(accepted.len()).expect("a change's events fit u64");
        Ok((verdicts, Some(Pending::new(first, count, rx))))
    }

    /// `body` posted to `route` of the owner of `partition`, under the same
    /// rule as [`Self::change`]: sent again only when surely not taken.
    async fn call<R: serde::de::DeserializeOwned>(
        &self,
        client: &tokio_postgres::Client,
        partition: i32,
        route: &str,
        body: &impl serde::Serialize,
    ) -> Result<R, InternalError> {
        let response = self.post(client, partition, route, body).await?;
        response.json().await.map_err(|e| InternalError::Call {
            partition,
            source: e,
        })
    }

    /// The owner's 200 to `body` posted to `route` (see [`Self::call`]).
    async fn post(
        &self,
        client: &tokio_postgres::Client,
        partition: i32,
        route: &str,
        body: &impl serde::Serialize,
    ) -> Result<reqwest::Response, InternalError> {
        let mut last = InternalError::NoOwner(partition);
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
            }
            let url = match self.owner(partition) {
                Some(url) => url,
                None => {
                    self.refresh(client).await?;
                    match self.owner(partition) {
                        Some(url) => url,
                        None => continue,
                    }
                }
            };
            let sent = self
                .http
                .post(format!("{url}/internal/v1/ledger/{partition}/{route}"))
                .header("authorization", &self.bearer)
                .json(body)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    self.refresh(client).await?;
                    last = InternalError::Call {
                        partition,
                        source: e,
                    };
                    continue;
                }
                Err(e) if e.is_timeout() => return Err(InternalError::Unknown(partition)),
                Err(e) => {
                    return Err(InternalError::Call {
                        partition,
                        source: e,
                    });
                }
            };
            let status = response.status().as_u16();
            if status == 200 {
                return Ok(response);
            }
            let text = response.text().await.unwrap_or_default();
            last = InternalError::Owner {
                partition,
                status,
                body: text,
            };
            match status {
                421 => self.refresh(client).await?,
                503 => {}
                _ => return Err(last),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_what_never_reached_a_judge_may_be_sent_again() {
        let unavailable = |e| matches!(money_error(e), MoneyError::Unavailable(_));
        assert!(unavailable(InternalError::NoOwner(1)));
        assert!(unavailable(InternalError::Unavailable(1, "loading".into())));
        for status in [400, 401, 421, 503] {
            assert!(unavailable(InternalError::Owner {
                partition: 1,
                status,
                body: String::new(),
            }));
        }
        // Nothing listens on port 1: the connection is refused.
        let refused = reqwest::Client::new()
            .post("http://127.0.0.1:1/")
            .send()
            .await
            .expect_err("nothing listens");
        assert!(refused.is_connect());
        assert!(unavailable(InternalError::Call {
            partition: 1,
            source: refused,
        }));
        assert!(!unavailable(InternalError::Owner {
            partition: 1,
            status: 500,
            body: String::new(),
        }));
        assert!(!unavailable(InternalError::Unknown(1)));
        assert!(!unavailable(InternalError::Garbled {
            partition: 1,
            why: "the answer ended before its line".into(),
        }));
    }
}
