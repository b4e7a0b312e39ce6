//! `troop-agent`: runs beside an inference engine and serves the network.
//!
//! Codemap (growing with issue 3):
//! - [`engine`]: finding the local engine (vLLM, Ollama, LM Studio, llama.cpp)
//!   and describing it: kind, models, context lengths, slots.
//! - [`gpu`]: GPU facts from `nvidia-smi`, or CPU mode.
//! - [`identity`]: the worker's Ed25519 key, created on first run, mode 0600.
//!
//! Still to come: the WebSocket link to the coordinator (`run`), job execution
//! and stream forwarding, draining on SIGTERM.

#![forbid(unsafe_code)]

pub mod engine;
pub mod gpu;
pub mod identity;
pub mod link;
