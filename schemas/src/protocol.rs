//! The worker protocol: what `troop-agent` and the coordinator say over the
//! agent's outbound WebSocket.
//!
//! Control messages are JSON text frames ([`WorkerMsg`], [`CoordinatorMsg`]).
//! Job output is binary frames ([`DataFrame`]): the job id, then raw bytes of
//! the engine's response stream, forwarded without parsing into messages per
//! token. Many jobs share one connection.

use serde::{Deserialize, Serialize};

use crate::receipt::Receipt;
use crate::types::{AccountId, HoldId, JobId, PublicKey, Signature, WorkerId};

pub const PROTOCOL_VERSION: u32 = 1;
/// A control frame carries at most one request body (prompts with images run
/// to megabytes); anything larger is refused before parsing.
pub const MAX_CONTROL_FRAME_BYTES: usize = 8 << 20;
/// Output is forwarded in pieces of at most this size.
pub const MAX_DATA_FRAME_BYTES: usize = 64 << 10;
pub const MAX_MODELS: usize = 256;
pub const MAX_GPUS: usize = 64;
pub const MAX_TEXT_BYTES: usize = 256;

/// What a worker signs to prove it holds its key: bound to this connection's
/// nonce and to the coordinator it is talking to, so it cannot be replayed
/// elsewhere.
pub const AUTH_DOMAIN: &[u8] = b"troop-worker-auth/v1\n";

pub fn auth_message(
    nonce: &[u8; 32],
    coordinator_key: &PublicKey,
    worker_key: &PublicKey,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(AUTH_DOMAIN.len() + 96);
    m.extend_from_slice(AUTH_DOMAIN);
    m.extend_from_slice(nonce);
    m.extend_from_slice(&coordinator_key.0);
    m.extend_from_slice(&worker_key.0);
    m
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    Vllm,
    Ollama,
    LmStudio,
    LlamaCpp,
    /// Speaks the OpenAI API but did not say which engine it is.
    OpenAiCompatible,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    /// Context window in tokens, when the engine reports it.
    pub context_length: Option<u64>,
}

/// GPU facts as `nvidia-smi` reports them. Self-reported, so used for display
/// and scheduling hints only until hardware proofs exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuInfo {
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub utilization_pct: u64,
    pub temperature_c: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub engine: EngineKind,
    pub models: Vec<ModelInfo>,
    pub gpus: Vec<GpuInfo>,
    pub free_slots: u32,
    pub total_slots: u32,
    /// The agent is finishing its jobs and takes no new ones (SIGTERM).
    pub draining: bool,
}

/// Token counts as the engine reported them (evidence, not the bill).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Worker → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMsg {
    Hello {
        protocol: u32,
        key: PublicKey,
        agent_version: String,
    },
    Auth {
        signature: Signature,
    },
    Heartbeat(Heartbeat),
    /// The engine accepted the job; output follows in data frames.
    JobStarted {
        job: JobId,
    },
    /// The engine finished; the worker's signed claim about the job.
    JobDone {
        job: JobId,
        usage: Option<EngineUsage>,
        // Boxed: one per job, and it would make every heartbeat as large.
        receipt: Box<Receipt>,
        worker_sig: Signature,
    },
    JobFailed {
        job: JobId,
        status: u16,
        error: String,
    },
}

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CoordinatorMsg {
    Challenge {
        nonce: String,
        coordinator_key: PublicKey,
    },
    Welcome {
        worker: WorkerId,
        heartbeat_interval_ms: u64,
    },
    /// Run `body` against the engine's `path` (`/v1/chat/completions` or
    /// `/v1/completions`), streaming.
    Job {
        job: JobId,
        hold: HoldId,
        consumer: AccountId,
        model: String,
        path: String,
        body: String,
    },
    Cancel {
        job: JobId,
    },
    /// The connection is refused or ends: banned key, bad auth, protocol error.
    Goodbye {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("data frame shorter than a job id")]
    ShortData,
    #[error("field `{0}` is over its limit")]
    Limit(&'static str),
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, ProtocolError> {
    if text.len() > MAX_CONTROL_FRAME_BYTES {
        return Err(ProtocolError::TooLarge {
            len: text.len(),
            max: MAX_CONTROL_FRAME_BYTES,
        });
    }
    serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

impl WorkerMsg {
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let msg: Self = parse(text)?;
        if let WorkerMsg::Heartbeat(h) = &msg {
            if h.models.len() > MAX_MODELS || h.models.iter().any(|m| m.name.len() > MAX_TEXT_BYTES)
            {
                return Err(ProtocolError::Limit("models"));
            }
            if h.gpus.len() > MAX_GPUS || h.gpus.iter().any(|g| g.name.len() > MAX_TEXT_BYTES) {
                return Err(ProtocolError::Limit("gpus"));
            }
        }
        if let WorkerMsg::Hello { agent_version, .. } = &msg
            && agent_version.len() > MAX_TEXT_BYTES
        {
            return Err(ProtocolError::Limit("agent_version"));
        }
        if let WorkerMsg::JobFailed { error, .. } = &msg
            && error.len() > 4 * MAX_TEXT_BYTES
        {
            return Err(ProtocolError::Limit("error"));
        }
        Ok(msg)
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("protocol messages always serialize")
    }
}

impl CoordinatorMsg {
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        parse(text)
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("protocol messages always serialize")
    }
}

/// A binary frame: 16 bytes of job id, then output bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFrame<'a> {
    pub job: JobId,
    pub bytes: &'a [u8],
}

impl<'a> DataFrame<'a> {
    pub fn encode(job: &JobId, bytes: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        if bytes.len() > MAX_DATA_FRAME_BYTES {
            return Err(ProtocolError::TooLarge {
                len: bytes.len(),
                max: MAX_DATA_FRAME_BYTES,
            });
        }
        let mut out = Vec::with_capacity(16 + bytes.len());
        out.extend_from_slice(&job.0);
        out.extend_from_slice(bytes);
        Ok(out)
    }

    pub fn decode(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        if frame.len() > 16 + MAX_DATA_FRAME_BYTES {
            return Err(ProtocolError::TooLarge {
                len: frame.len(),
                max: 16 + MAX_DATA_FRAME_BYTES,
            });
        }
        let (id, bytes) = frame.split_at_checked(16).ok_or(ProtocolError::ShortData)?;
        Ok(Self {
            job: JobId(id.try_into().map_err(|_| ProtocolError::ShortData)?),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> WorkerMsg {
        WorkerMsg::Heartbeat(Heartbeat {
            engine: EngineKind::LlamaCpp,
            models: vec![ModelInfo {
                name: "smollm2-135m".into(),
                context_length: Some(8192),
            }],
            gpus: vec![GpuInfo {
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_mib: 81_559,
                memory_used_mib: 1,
                utilization_pct: 0,
                temperature_c: 31,
            }],
            free_slots: 4,
            total_slots: 4,
            draining: false,
        })
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = heartbeat();
        let text = m.to_text();
        assert!(text.starts_with("{\"type\":\"heartbeat\""), "{text}");
        assert_eq!(WorkerMsg::parse(&text), Ok(m));
        let c = CoordinatorMsg::Cancel {
            job: JobId::derive(b"j"),
        };
        assert_eq!(CoordinatorMsg::parse(&c.to_text()), Ok(c));
    }

    #[test]
    fn garbage_and_oversized_messages_are_refused() {
        assert!(matches!(
            WorkerMsg::parse("{\"type\":\"launch_missiles\"}"),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            WorkerMsg::parse("not json"),
            Err(ProtocolError::Malformed(_))
        ));
        let extra = heartbeat().to_text().replacen('{', "{\"extra\":1,", 1);
        assert!(matches!(
            WorkerMsg::parse(&extra),
            Err(ProtocolError::Malformed(_))
        ));
        let huge = " ".repeat(MAX_CONTROL_FRAME_BYTES + 1);
        assert!(matches!(
            WorkerMsg::parse(&huge),
            Err(ProtocolError::TooLarge { .. })
        ));
        let WorkerMsg::Heartbeat(mut h) = heartbeat() else {
            unreachable!()
        };
        h.models = vec![
            ModelInfo {
                name: "m".into(),
                context_length: None
            };
            MAX_MODELS + 1
        ];
        assert_eq!(
            WorkerMsg::parse(&WorkerMsg::Heartbeat(h).to_text()),
            Err(ProtocolError::Limit("models"))
        );
    }

    #[test]
    fn data_frames_carry_bytes_for_one_job() {
        let job = JobId::derive(b"j");
        let frame = DataFrame::encode(&job, b"data: {}\n\n").expect("encode");
        assert_eq!(
            DataFrame::decode(&frame),
            Ok(DataFrame {
                job,
                bytes: b"data: {}\n\n"
            })
        );
        assert_eq!(
            DataFrame::decode(&frame[..15]),
            Err(ProtocolError::ShortData)
        );
        assert!(DataFrame::encode(&job, &vec![0; MAX_DATA_FRAME_BYTES + 1]).is_err());
    }

    #[test]
    fn auth_is_bound_to_nonce_and_both_keys() {
        let (a, b) = (PublicKey([1; 32]), PublicKey([2; 32]));
        let m = auth_message(&[9; 32], &a, &b);
        assert!(m.starts_with(AUTH_DOMAIN));
        assert_ne!(m, auth_message(&[9; 32], &b, &a));
        assert_ne!(m, auth_message(&[8; 32], &a, &b));
    }
}
