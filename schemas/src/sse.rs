//! The stream meter: reads an engine's server-sent-events stream as it is
//! forwarded, byte-exact and in whatever pieces the network delivers, and
//! counts what the consumer actually received. This count, not the worker's
//! word, bounds the bill.

use crate::types::Digest;

/// An SSE line longer than this is garbage (a chunk is a few hundred bytes).
pub const MAX_LINE_BYTES: usize = 256 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeterError {
    #[error("stream line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("stream is not UTF-8")]
    NotUtf8,
    #[error("stream event is not JSON: {0}")]
    NotJson(String),
    #[error("data after [DONE]")]
    AfterDone,
}

/// Usage as reported in the stream's final chunk (`stream_options.include_usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportedUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A stream chunk as engines send it: only what the meter reads. An `error`
/// member sends it down the general path (the typed parse refuses it).
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    usage: Option<ChunkUsage>,
    #[serde(default, rename = "error")]
    _error: Option<Never>,
}

/// Deserializes from nothing: a chunk with an `error` member is not a [`Chunk`].
enum Never {}

impl<'de> serde::Deserialize<'de> for Never {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("an error event"))
    }
}

#[derive(serde::Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<ChunkDelta<'a>>,
    #[serde(borrow, default)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

/// A piece of a tool call: the first names it, the rest add to its arguments.
#[derive(serde::Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow, default)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<std::borrow::Cow<'a, str>>,
}

/// Most tool calls kept for a non-streaming answer.
pub const MAX_TOOL_CALLS: usize = 128;

/// A tool call put together from its streamed pieces (OpenAI's shape).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: ToolFunction,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ToolFunction {
    pub name: String,
    pub arguments: String,
}

#[derive(serde::Deserialize)]
struct ChunkUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Debug)]
pub struct Meter {
    hasher: blake3::Hasher,
    line: Vec<u8>,
    bytes: u64,
    events: u64,
    deltas: u64,
    content_bytes: u64,
    usage: Option<ReportedUsage>,
    finish_reason: Option<String>,
    done: bool,
    error: Option<String>,
    /// Generated text, kept only when asked for (to answer non-streaming requests).
    text: Option<String>,
    /// Tool calls, kept with the text.
    tool_calls: Vec<ToolCall>,
}

/// Most text kept for a non-streaming answer.
pub const MAX_COLLECTED_BYTES: usize = 16 << 20;

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

/// What the meter saw, once the stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    /// BLAKE3 of every byte forwarded: the receipt's `response_digest`.
    pub digest: Digest,
    pub bytes: u64,
    /// `data:` events, including the usage chunk.
    pub events: u64,
    /// Events carrying non-empty generated text (chat `delta.content` or
    /// completions `text`): one per token on llama.cpp and vLLM.
    pub deltas: u64,
    pub content_bytes: u64,
    pub usage: Option<ReportedUsage>,
    pub finish_reason: Option<String>,
    /// The stream ended with `data: [DONE]`.
    pub done: bool,
    /// The engine sent an error event (`{"error": …}`).
    pub error: Option<String>,
    /// The generated text, if the meter was made with [`Meter::collecting`].
    pub text: Option<String>,
    /// Tool calls put together from their pieces (collecting meters only).
    pub tool_calls: Vec<ToolCall>,
}

impl Meter {
    pub fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            line: Vec::new(),
            bytes: 0,
            events: 0,
            deltas: 0,
            content_bytes: 0,
            usage: None,
            finish_reason: None,
            done: false,
            error: None,
            text: None,
            tool_calls: Vec::new(),
        }
    }

    /// A meter that also keeps the generated text.
    pub fn collecting() -> Self {
        Self {
            text: Some(String::new()),
            ..Self::new()
        }
    }

    /// Feeds the next piece of the stream, exactly as forwarded.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), MeterError> {
        self.hasher.update(piece);
        self.bytes += piece.len() as u64;
        let mut rest = piece;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = (&rest[..end], &rest[end + 1..]);
            if self.line.is_empty() {
                // The whole line is in this piece: no copy.
                if line.len() > MAX_LINE_BYTES {
                    return Err(MeterError::LineTooLong);
                }
                self.line_done(line)?;
            } else {
                if self.line.len() + line.len() > MAX_LINE_BYTES {
                    return Err(MeterError::LineTooLong);
                }
                let mut whole = std::mem::take(&mut self.line);
                whole.extend_from_slice(line);
                self.line_done(&whole)?;
            }
            rest = tail;
        }
        if self.line.len() + rest.len() > MAX_LINE_BYTES {
            return Err(MeterError::LineTooLong);
        }
        self.line.extend_from_slice(rest);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8]) -> Result<(), MeterError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            // Blank separators, comments (`:`), `event:`/`id:` fields.
            return Ok(());
        };
        let data = std::str::from_utf8(data)
            .map_err(|_| MeterError::NotUtf8)?
            .trim_start();
        if self.done {
            return Err(MeterError::AfterDone);
        }
        if data == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        // The shape engines send, borrowed from the line; anything else (an
        // error event, content that is not a string) takes the general path.
        if let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(data) {
            self.events += 1;
            for c in chunk.choices.iter().flatten() {
                let text = c
                    .delta
                    .as_ref()
                    .and_then(|d| d.content.as_deref())
                    .or(c.text.as_deref())
                    .unwrap_or("");
                let calls = c.delta.as_ref().and_then(|d| d.tool_calls.as_deref());
                let call_bytes = calls.map_or(0, |calls| self.collect_tool_calls(calls));
                if text.is_empty() && call_bytes > 0 {
                    // A tool call's pieces are generated tokens like text.
                    self.deltas += 1;
                    self.content_bytes += call_bytes;
                }
                self.count_text(text);
                if let Some(r) = &c.finish_reason {
                    self.finish_reason = Some(r.chars().take(64).collect());
                }
            }
            if let Some(u) = chunk.usage {
                self.usage = Some(ReportedUsage {
                    prompt_tokens: u.prompt_tokens.unwrap_or(0),
                    completion_tokens: u.completion_tokens.unwrap_or(0),
                });
            }
            return Ok(());
        }
        let v: serde_json::Value =
            serde_json::from_str(data).map_err(|e| MeterError::NotJson(e.to_string()))?;
        self.events += 1;
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(|m| m.as_str())
                .map_or_else(|| err.to_string(), str::to_owned);
            self.error = Some(msg.chars().take(512).collect());
        }
        if let Some(choices) = v.get("choices").and_then(|c| c.as_array()) {
            for c in choices {
                let text = c
                    .pointer("/delta/content")
                    .or_else(|| c.get("text"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                self.count_text(text);
                if let Some(r) = c.get("finish_reason").and_then(|r| r.as_str()) {
                    self.finish_reason = Some(r.chars().take(64).collect());
                }
            }
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(ReportedUsage {
                prompt_tokens: u.get("prompt_tokens").and_then(|x| x.as_u64()).unwrap_or(0),
                completion_tokens: u
                    .get("completion_tokens")
                    .and_then(|x| x.as_u64())
                    .unwrap_or(0),
            });
        }
        Ok(())
    }

    /// Adds tool-call pieces; returns how many bytes of name and arguments they carried.
    fn collect_tool_calls(&mut self, calls: &[ToolCallDelta<'_>]) -> u64 {
        let mut bytes = 0u64;
        for d in calls {
            let f = d.function.as_ref();
            let name = f.and_then(|f| f.name.as_deref()).unwrap_or("");
            let args = f.and_then(|f| f.arguments.as_deref()).unwrap_or("");
            bytes += (name.len() + args.len()) as u64;
            if self.text.is_none() {
                continue;
            }
            let index = usize::try_from(d.index.unwrap_or(0)).unwrap_or(usize::MAX);
            if index >= MAX_TOOL_CALLS {
                continue;
            }
            if self.tool_calls.len() <= index {
                self.tool_calls.resize_with(index + 1, ToolCall::default);
            }
            let kept: usize = self
                .tool_calls
                .iter()
                .map(|c| c.function.arguments.len() + c.function.name.len())
                .sum();
            let call = &mut self.tool_calls[index];
            if let Some(id) = d.id.as_deref().filter(|i| !i.is_empty()) {
                call.id = id.chars().take(256).collect();
            }
            if let Some(kind) = d.kind.as_deref() {
                call.kind = kind.chars().take(64).collect();
            }
            if kept + name.len() + args.len() <= MAX_COLLECTED_BYTES {
                call.function.name.push_str(name);
                call.function.arguments.push_str(args);
            }
        }
        bytes
    }

    fn count_text(&mut self, text: &str) {
        if !text.is_empty() {
            self.deltas += 1;
            self.content_bytes += text.len() as u64;
            if let Some(t) = self.text.as_mut()
                && t.len() + text.len() <= MAX_COLLECTED_BYTES
            {
                t.push_str(text);
            }
        }
    }

    pub fn finish(self) -> Reading {
        Reading {
            digest: Digest(*self.hasher.finalize().as_bytes()),
            bytes: self.bytes,
            events: self.events,
            deltas: self.deltas,
            content_bytes: self.content_bytes,
            usage: self.usage,
            finish_reason: self.finish_reason,
            done: self.done,
            error: self.error,
            text: self.text,
            tool_calls: self
                .tool_calls
                .into_iter()
                .filter(|c| !c.function.name.is_empty() || !c.function.arguments.is_empty())
                .map(|mut c| {
                    if c.kind.is_empty() {
                        c.kind = "function".into();
                    }
                    c
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A llama.cpp chat stream as recorded from the real server (ids shortened).
    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"In\"}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\" silicon\"}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"object\":\"chat.completion.chunk\"}\n\n",
        "data: {\"choices\":[],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":32,\"total_tokens\":34}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn counts_a_real_stream() {
        let mut m = Meter::collecting();
        m.feed(STREAM.as_bytes()).expect("valid");
        let r = m.finish();
        assert_eq!(r.text.as_deref(), Some("In silicon"));
        assert_eq!((r.events, r.deltas, r.content_bytes), (5, 2, 10));
        assert_eq!(
            r.usage,
            Some(ReportedUsage {
                prompt_tokens: 32,
                completion_tokens: 2
            })
        );
        assert_eq!(r.finish_reason.as_deref(), Some("length"));
        assert!(r.done);
        assert_eq!(r.digest, Digest::of(STREAM.as_bytes()));
    }

    #[test]
    fn any_split_of_the_stream_reads_the_same() {
        let whole = {
            let mut m = Meter::new();
            m.feed(STREAM.as_bytes()).expect("valid");
            m.finish()
        };
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            for cut2 in [cut, (cut + 7).min(bytes.len()), bytes.len()] {
                let mut m = Meter::new();
                m.feed(&bytes[..cut]).expect("a");
                m.feed(&bytes[cut..cut2]).expect("b");
                m.feed(&bytes[cut2..]).expect("c");
                assert_eq!(m.finish(), whole, "cut at {cut}/{cut2}");
            }
        }
    }

    #[test]
    fn garbage_is_refused_and_errors_are_noticed() {
        let mut m = Meter::new();
        assert!(matches!(
            m.feed(b"data: {not json\n"),
            Err(MeterError::NotJson(_))
        ));
        let mut m = Meter::new();
        assert_eq!(m.feed(b"data: \xff\xfe\n"), Err(MeterError::NotUtf8));
        let mut m = Meter::new();
        assert_eq!(
            m.feed(&vec![b'x'; MAX_LINE_BYTES + 1]),
            Err(MeterError::LineTooLong)
        );
        let mut m = Meter::new();
        assert_eq!(
            m.feed(b"data: [DONE]\n\ndata: {}\n"),
            Err(MeterError::AfterDone)
        );
        let mut m = Meter::new();
        m.feed(b": keep-alive\r\n\r\ndata: {\"error\":{\"message\":\"context full\",\"type\":\"exceed_context_size_error\"}}\r\n").expect("ok");
        let r = m.finish();
        assert_eq!(r.error.as_deref(), Some("context full"));
        assert_eq!(r.deltas, 0);
        assert!(!r.done);
    }

    #[test]
    fn tool_calls_are_counted_and_put_together() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let mut m = Meter::collecting();
        m.feed(stream.as_bytes()).expect("valid");
        let r = m.finish();
        assert_eq!(r.deltas, 3, "each piece of the call is a generated token");
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(
            r.tool_calls,
            vec![ToolCall {
                id: "call_1".into(),
                kind: "function".into(),
                function: ToolFunction {
                    name: "get_weather".into(),
                    arguments: "{\"city\": \"Paris\"}".into()
                }
            }]
        );
        let mut streaming = Meter::new();
        streaming.feed(stream.as_bytes()).expect("valid");
        let r = streaming.finish();
        assert_eq!((r.deltas, r.tool_calls.len()), (3, 0), "counted, not kept");
    }

    #[test]
    fn completions_text_counts_too() {
        let mut m = Meter::new();
        m.feed(b"data: {\"choices\":[{\"text\":\"Hello\",\"index\":0}]}\n\ndata: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n").expect("ok");
        let r = m.finish();
        assert_eq!((r.deltas, r.content_bytes), (1, 5));
    }
}
