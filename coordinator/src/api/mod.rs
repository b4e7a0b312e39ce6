//! The consumer-facing OpenAI-compatible API: request validation and error
//! shapes (pure), then the HTTP handlers.

pub mod openai;
