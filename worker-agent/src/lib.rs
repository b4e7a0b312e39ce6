//! `troop-agent`: runs beside an inference engine and serves the network.
//!
//! Codemap:
//! - [`engine`]: finding the local engine (vLLM, Ollama, LM Studio, llama.cpp)
//!   and describing it: kind, models, context lengths, slots.
//! - [`gpu`]: GPU facts from `nvidia-smi`, or CPU mode.
//! - [`identity`]: the worker's Ed25519 key, created on first run, mode 0600.
//! - [`link`]: the outbound WebSocket to the coordinator: challenge auth,
//!   heartbeats, jobs run against the engine with their output forwarded as
//!   data frames, signed receipts, cancel, drain on SIGTERM, jittered
//!   reconnect. `troop-loadtest workers` runs many of these in one process.

#![forbid(unsafe_code)]

pub mod engine;
pub mod gpu;
pub mod identity;
pub mod link;
