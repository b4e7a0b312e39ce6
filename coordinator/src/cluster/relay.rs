//! Relaying a job to a worker on another node (CLUSTER.md, "Serving a
//! request in the cluster"): when no worker of this node can take a request,
//! the job goes to a node that offers room for its model, which places it on
//! one of its own workers and streams the worker's bytes and its end back.
//!
//! The session, the metering, the countersignature and the settlement stay
//! on the node the consumer is connected to: the coordinator that bills the
//! tokens is the one that streamed them to the consumer. The serving node
//! only forwards; it is trusted as a node (the cluster's secret), the worker
//! is not (its receipt is checked by the session as for a local worker).
//!
//! The relayed body is a sequence of frames, `[kind u8][length u32 BE]
//! [payload]`: data (the worker's bytes as it sent them) and, last, the end
//! (how the worker said the job ended, with its signed receipt). Bounded at
//! every step: the worker's bytes go through the serving node's job channel,
//! HTTP flow control, and this node's job channel, so a slow consumer slows
//! the worker, and one that stops reading loses its job on the serving node
//! as it would on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use troop_schemas::protocol::{CoordinatorMsg, MAX_DATA_FRAME_BYTES};
use troop_schemas::sse::Meter;
use troop_schemas::{AccountId, HoldId, JobId, WorkerId};

use crate::actors::registry::{Finished, LinkOf, Place, Placed, Registry};
use crate::actors::worker::{Assign, Cancel, JobEnd, JobSlot, Release, WorkerLink};
use crate::api::openai::ApiError;
use crate::cluster::internal::{Internal, admitted, internal_error};
use crate::domain::placement::{NoWorker, Offer};
use crate::metrics::{Metrics, Phase};
use crate::server::{error_response, now_ms};

/// The header naming the worker the serving node chose.
pub const WORKER_HEADER: &str = "troop-worker";
/// The largest end frame: a receipt and usage are a few hundred bytes.
const MAX_END_BYTES: usize = 64 << 10;
const FRAME_HEADER_BYTES: usize = 5;
const KIND_DATA: u8 = 0;
const KIND_END: u8 = 1;
/// Output pieces buffered between the worker's connection and the relay.
const JOB_CHANNEL: usize = 64;
/// How long the serving node waits for the worker's receipt once its output
/// ended (the consumer's node waits as long for the end frame).
const RECEIPT_WAIT: Duration = Duration::from_secs(10);
/// A node that does not accept a connection at once is not used for this job.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The job as the consumer's node hands it to the serving node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RelayJob {
    pub job: JobId,
    pub hold: HoldId,
    pub consumer: AccountId,
    pub model: String,
    pub path: String,
    pub body: String,
    /// Workers already tried for this request.
    pub exclude: Vec<WorkerId>,
}

/// Asks the serving node to tell its worker to stop a job.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RelayCancel {
    pub worker: WorkerId,
    pub job: JobId,
}

fn frame(kind: u8, payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).expect("frames are bounded far below 4 GiB");
    let mut out = BytesMut::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.put_u8(kind);
    out.put_u32(len);
    out.put_slice(payload);
    out.freeze()
}

/// One piece of the worker's output, as a frame.
pub fn data_frame(bytes: &[u8]) -> Bytes {
    frame(KIND_DATA, bytes)
}

/// The job's end, as the last frame.
pub fn end_frame(end: &JobEnd) -> Bytes {
    frame(
        KIND_END,
        &serde_json::to_vec(end).expect("an end serializes"),
    )
}

/// A frame read back.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data(Bytes),
    End(JobEnd),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a relay frame of kind {kind} holds {len} bytes, over the {max} allowed")]
    TooLong { kind: u8, len: usize, max: usize },
    #[error("unknown relay frame kind {0}")]
    Kind(u8),
    #[error("unreadable end frame: {0}")]
    End(String),
}

/// Frames put back together from the body's chunks, however HTTP cut them.
#[derive(Debug, Default)]
pub struct Frames {
    buf: BytesMut,
}

impl Frames {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Nothing is buffered past the frames read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let kind = self.buf[0];
        let len = usize::try_from(u32::from_be_bytes(
            self.buf[1..FRAME_HEADER_BYTES]
                .try_into()
                .expect("four bytes"),
        ))
        .unwrap_or(usize::MAX);
        let max = match kind {
            KIND_DATA => MAX_DATA_FRAME_BYTES,
            KIND_END => MAX_END_BYTES,
            other => return Err(FrameError::Kind(other)),
        };
        if len > max {
            return Err(FrameError::TooLong { kind, len, max });
        }
        if self.buf.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_BYTES);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(match kind {
            KIND_DATA => Frame::Data(payload),
            _ => Frame::End(
                serde_json::from_slice(&payload).map_err(|e| FrameError::End(e.to_string()))?,
            ),
        }))
    }
}

/// What the serving side needs: this node's workers.
#[derive(Debug, Clone)]
pub struct RelayHere {
    pub registry: Addr<Registry>,
    /// Where the serving side's steps are recorded (`relay_placed`,
    /// `relay_first_byte`).
    pub metrics: Arc<Metrics>,
    /// The largest job body taken (the consumer API's own limit, escaped).
    pub max_job_bytes: usize,
}

/// A job relayed here, on one of this node's workers, while its bytes flow
/// back. Dropped when the relay ends: if the consumer's node went away
/// before the end (it died, or gave up on the job), the worker is told to
/// stop; either way the worker's slot is freed and its speed measured.
struct Relayed {
    link: WorkerLink,
    job: JobId,
    registry: Addr<Registry>,
    data: mpsc::Receiver<Bytes>,
    end: Option<oneshot::Receiver<JobEnd>>,
    ended: bool,
    /// Counts tokens for the worker's speed (the bill is counted by the
    /// consumer's node); dropped if the output is not an event stream.
    meter: Option<Meter>,
    started: Instant,
    /// Set until the first byte was seen, to time it.
    first_byte: Option<Arc<Metrics>>,
}

impl Drop for Relayed {
    fn drop(&mut self) {
        if !self.ended {
            self.link.addr.do_send(Cancel(self.job));
        }
        self.link.addr.do_send(Release(self.job));
        let tokens = self.meter.take().map_or(0, |m| m.finish().deltas);
        self.registry.do_send(Finished {
            worker: self.link.worker,
            tokens,
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
}

impl Relayed {
    /// The next frame of the body: data while the worker sends it, then its end.
    async fn next(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Self)> {
        if self.ended {
            return None;
        }
        if let Some(piece) = self.data.recv().await {
            if let Some(metrics) = self.first_byte.take() {
                metrics.phase(Phase::RelayFirstByte, self.started.elapsed());
            }
            if let Some(meter) = self.meter.as_mut()
                && meter.feed(&piece).is_err()
            {
                self.meter = None;
            }
            return Some((Ok(data_frame(&piece)), self));
        }
        // The output is over (the worker's slot was removed): its end follows.
        let end = match self.end.take() {
            Some(rx) => tokio::time::timeout(RECEIPT_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        self.ended = true;
        let end = end.unwrap_or(JobEnd::Lost);
        Some((Ok(end_frame(&end)), self))
    }
}

/// `POST /internal/v1/jobs`: places a job from another node on a worker
/// here and streams its frames back.
pub async fn job_handler(
    internal: web::Data<Internal>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let received = Instant::now();
    let job: RelayJob = match admitted(&internal, &request, &body) {
        Ok(j) => j,
        Err(refused) => return error_response(&refused),
    };
    let Some(here) = internal.relay.as_ref() else {
        return error_response(&internal_error(
            404,
            "no_relay",
            "this node serves no relayed jobs",
        ));
    };
    let placed = here
        .registry
        .send(Place {
            model: job.model.clone(),
            exclude: job.exclude.clone(),
            exclude_nodes: Vec::new(),
            relay: false,
            now_ms: now_ms(),
        })
        .await;
    let link = match placed {
        Ok(Ok(Placed::Local(link))) => link,
        Ok(Ok(Placed::Remote(_))) => unreachable!("a relayed job is never relayed on"),
        Ok(Err(NoWorker::UnknownModel)) => {
            return error_response(&ApiError::model_unavailable(&job.model, 1));
        }
        Ok(Err(NoWorker::NoCapacity)) | Err(_) => {
            return error_response(&internal_error(
                503,
                "no_capacity",
                "no worker here has room for the job now",
            ));
        }
    };
    let (data_tx, data_rx) = mpsc::channel(JOB_CHANNEL);
    let (end_tx, end_rx) = oneshot::channel();
    link.addr.do_send(Assign {
        job: job.job,
        slot: JobSlot {
            data: data_tx,
            end: end_tx,
        },
        msg: CoordinatorMsg::Job {
            job: job.job,
            hold: job.hold,
            consumer: job.consumer,
            model: job.model,
            path: job.path,
            body: job.body,
        },
    });
    let worker = link.worker;
    let started = Instant::now();
    here.metrics.phase(Phase::RelayPlaced, started - received);
    let relayed = Relayed {
        link,
        job: job.job,
        registry: here.registry.clone(),
        data: data_rx,
        end: Some(end_rx),
        ended: false,
        meter: Some(Meter::new()),
        started,
        first_byte: Some(Arc::clone(&here.metrics)),
    };
    HttpResponse::Ok()
        .insert_header((WORKER_HEADER, worker.to_string()))
        .content_type("application/octet-stream")
        .streaming(futures_util::stream::unfold(relayed, Relayed::next))
}

/// `POST /internal/v1/jobs/cancel`: tells a worker here to stop a relayed
/// job; its receipt still comes back through the relay.
pub async fn cancel_handler(
    internal: web::Data<Internal>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let cancel: RelayCancel = match admitted(&internal, &request, &body) {
        Ok(c) => c,
        Err(refused) => return error_response(&refused),
    };
    if let Some(here) = internal.relay.as_ref()
        && let Ok(Some(link)) = here.registry.send(LinkOf(cancel.worker)).await
    {
        link.addr.do_send(Cancel(cancel.job));
    }
    HttpResponse::NoContent().finish()
}

/// Why a node did not take a relayed job: nothing runs there, so the job
/// may go to another.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("calling node {node}: {source}")]
    Call {
        node: String,
        source: reqwest::Error,
    },
    #[error("node {node} answered {status}: {body}")]
    Refused {
        node: String,
        status: u16,
        body: String,
    },
    #[error("node {node} named no worker")]
    NoWorker { node: String },
}

/// The consumer's side: sends jobs to other nodes and relays their frames
/// into the job's channel.
#[derive(Debug)]
pub struct Relay {
    http: reqwest::Client,
    bearer: String,
}

impl Relay {
    pub fn new(secret: &str) -> Self {
        Self {
            // No overall timeout: a stream lasts as long as the answer. The
            // session's deadlines bound the wait for the first byte and the end.
            http: reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .build()
                .expect("an HTTP client"),
            bearer: format!("Bearer {secret}"),
        }
    }

    /// Sends `job` to the node of `offer`. Once that node has given it to a
    /// worker (named in the answer), the worker's bytes and its end flow
    /// into `slot` from a task of their own, and the worker is returned.
    /// An error means the job runs nowhere: another node may be tried.
    pub async fn open(
        &self,
        offer: &Offer,
        job: &RelayJob,
        slot: JobSlot,
    ) -> Result<WorkerId, RelayError> {
        let node = || offer.node.clone();
        let response = self
            .http
            .post(format!("{}/internal/v1/jobs", offer.internal_url))
            .header("authorization", &self.bearer)
            .json(job)
            .send()
            .await
            .map_err(|source| RelayError::Call {
                node: node(),
                source,
            })?;
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return Err(RelayError::Refused {
                node: node(),
                status,
                body,
            });
        }
        let worker = response
            .headers()
            .get(WORKER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<WorkerId>().ok())
            .ok_or_else(|| RelayError::NoWorker { node: node() })?;
        tokio::spawn(pump(response, slot, offer.node.clone()));
        Ok(worker)
    }

    /// Tells `worker` on the node at `internal_url` to stop `job`, without
    /// waiting: the job's end still arrives through its relay.
    pub fn cancel(&self, internal_url: &str, worker: WorkerId, job: JobId) {
        let request = self
            .http
            .post(format!("{internal_url}/internal/v1/jobs/cancel"))
            .header("authorization", &self.bearer)
            .timeout(CONNECT_TIMEOUT * 5)
            .json(&RelayCancel { worker, job });
        tokio::spawn(async move {
            if let Err(e) = request.send().await {
                tracing::warn!(%job, error = %e, "cancelling a relayed job failed");
            }
        });
    }
}

/// Moves a relayed job's frames into its slot until its end, or until the
/// session is done with the job (it dropped the end's receiver): then the
/// connection is dropped, and the serving node stops the worker.
async fn pump(mut response: reqwest::Response, slot: JobSlot, node: String) {
    let JobSlot { data, mut end } = slot;
    // Output nobody reads any more (the consumer left) is dropped; the end
    // is still awaited, since it carries the receipt for what was delivered.
    let mut data = Some(data);
    let mut frames = Frames::default();
    let outcome = 'relay: loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk,
            () = end.closed() => return,
        };
        match chunk {
            Ok(Some(chunk)) => frames.push(&chunk),
            Ok(None) => break JobEnd::Lost,
            Err(e) => {
                tracing::warn!(%node, error = %e, "a relayed job's stream broke");
                break JobEnd::Lost;
            }
        }
        loop {
            match frames.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Data(piece))) => {
                    if let Some(tx) = &data {
                        let sent = tokio::select! {
                            sent = tx.send(piece) => sent.is_ok(),
                            () = end.closed() => return,
                        };
                        if !sent {
                            data = None;
                        }
                    }
                }
                Ok(Some(Frame::End(e))) => break 'relay e,
                Err(e) => {
                    tracing::warn!(%node, error = %e, "a relayed job sent a bad frame");
                    break 'relay JobEnd::Lost;
                }
            }
        }
    };
    // The output is over before its end is told, as on a local worker.
    drop(data);
    let ended = !matches!(outcome, JobEnd::Lost);
    let _ = end.send(outcome);
    if ended && frames.is_empty() {
        super::finish(&mut response).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_whole_however_the_body_is_cut() {
        let end = JobEnd::Failed {
            status: 503,
            error: "engine busy".into(),
        };
        let mut body = BytesMut::new();
        body.extend_from_slice(&data_frame(b"data: one\n\n"));
        body.extend_from_slice(&data_frame(b""));
        body.extend_from_slice(&end_frame(&end));
        let whole = body.freeze();
        for cut in [1, 2, 5, 7, whole.len()] {
            let mut frames = Frames::default();
            let mut got = Vec::new();
            for chunk in whole.chunks(cut) {
                frames.push(chunk);
                while let Some(f) = frames.next_frame().expect("valid frames") {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                vec![
                    Frame::Data(Bytes::from_static(b"data: one\n\n")),
                    Frame::Data(Bytes::new()),
                    Frame::End(end.clone()),
                ],
                "chunks of {cut} bytes"
            );
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_before_they_are_buffered() {
        let mut frames = Frames::default();
        let mut header = vec![KIND_DATA];
        let too_long = u32::try_from(MAX_DATA_FRAME_BYTES + 1).expect("small");
        header.extend_from_slice(&too_long.to_be_bytes());
        frames.push(&header);
        assert!(matches!(
            frames.next_frame(),
            Err(FrameError::TooLong {
                kind: KIND_DATA,
                ..
            })
        ));
        let mut frames = Frames::default();
        frames.push(&[9, 0, 0, 0, 0]);
        assert_eq!(frames.next_frame(), Err(FrameError::Kind(9)));
        let mut frames = Frames::default();
        frames.push(&frame(KIND_END, b"{not json"));
        assert!(matches!(frames.next_frame(), Err(FrameError::End(_))));
    }
}
