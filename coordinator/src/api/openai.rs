//! OpenAI wire compatibility: errors in OpenAI's shape, and validation of chat
//! and completion requests. Unknown fields (tools, response_format, sampling
//! options) pass through to the engine unchanged.

use serde_json::{Map, Value, json};

/// An error as OpenAI's SDKs expect it: HTTP status plus
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(
        status: u16,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(400, "invalid_request_error", None, message)
        }
    }
    pub fn malformed_json(why: impl std::fmt::Display) -> Self {
        Self::new(
            400,
            "invalid_request_error",
            None,
            format!("We could not parse the JSON body of your request: {why}"),
        )
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            message,
        )
    }
    pub fn insufficient_credits(needed_micro: u64, available_micro: i128) -> Self {
        Self::new(
            402,
            "insufficient_quota",
            Some("insufficient_quota"),
            format!(
                "This request needs a hold of {needed_micro} micro-credits; the account has {available_micro} available."
            ),
        )
    }
    pub fn model_not_found(model: &str) -> Self {
        let shown: String = model.chars().take(128).collect();
        Self {
            param: Some("model"),
            ..Self::new(
                404,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{shown}` does not exist (it has no price on this network)."),
            )
        }
    }
    /// A priced model that no worker serves now: workers come and go (an
    /// agent moving between nodes, a node whose offers are being re-read), so
    /// asking again shortly may work, unlike a 404.
    pub fn model_unavailable(model: &str, retry_after_s: u64) -> Self {
        let shown: String = model.chars().take(128).collect();
        Self {
            retry_after_s: Some(retry_after_s),
            param: Some("model"),
            ..Self::new(
                503,
                "server_error",
                Some("no_capacity"),
                format!("No worker serves the model `{shown}` now. Retry shortly."),
            )
        }
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            format!("Request body is larger than {limit} bytes."),
        )
    }
    pub fn rate_limited(retry_after_s: u64, message: impl Into<String>) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::new(
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                message,
            )
        }
    }
    pub fn no_capacity(retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::new(
                503,
                "server_error",
                Some("no_capacity"),
                "Every worker serving this model is busy. Retry shortly.",
            )
        }
    }
    /// The books or the database cannot answer now (an owner moving, a
    /// database restarting): nothing was done, asking again may work.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after_s: Some(1),
            ..Self::new(503, "server_error", Some("service_unavailable"), message)
        }
    }
    /// A cluster node that has not read the network's prices yet: it cannot
    /// place a hold, and is not ready (`/health/ready`).
    pub fn starting() -> Self {
        Self::unavailable("this node is starting: it has not read the network's prices yet")
    }
    /// A write whose outcome is unknown: not acknowledged, and not to be
    /// sent again blindly (look before retrying).
    pub fn not_durable(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", Some("not_durable"), message)
    }
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(502, "server_error", Some("worker_failed"), message)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_messages: usize,
    /// Default when the request names no `max_tokens`.
    pub default_max_tokens: u64,
    /// The most a request may ask for.
    pub max_tokens: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_messages: 1024,
            default_max_tokens: 1024,
            max_tokens: 32_768,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// A validated request, and the body to send the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub model: String,
    pub stream: bool,
    /// The consumer asked for a usage chunk in its stream.
    pub include_usage: bool,
    pub max_tokens: u64,
    /// Bytes of prompt text (message contents, or the prompt), for the hold and the bill.
    pub prompt_bytes: usize,
    pub messages: usize,
    /// The consumer's body with `stream` forced on, usage requested and
    /// `max_tokens` made explicit: the coordinator always streams from the
    /// worker, so that it can count.
    pub engine_body: Value,
}

fn text_bytes(content: &Value) -> usize {
    match content {
        Value::String(s) => s.len(),
        // Content parts: text parts count; other parts (images) by their JSON size.
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                p.get("text")
                    .and_then(Value::as_str)
                    .map_or_else(|| p.to_string().len(), str::len)
            })
            .sum(),
        Value::Null => 0,
        other => other.to_string().len(),
    }
}

pub fn validate(endpoint: Endpoint, body: &[u8], limits: &Limits) -> Result<Validated, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(ApiError::malformed_json)?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid(
            "body",
            "The request body must be a JSON object.",
        ));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(
                "model",
                "`model` must be 1 to 256 bytes.",
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "model",
                "You must provide a model parameter.",
            ));
        }
    };
    let (prompt_bytes, messages) = match endpoint {
        Endpoint::Chat => {
            let Some(Value::Array(msgs)) = obj.get("messages") else {
                return Err(ApiError::invalid(
                    "messages",
                    "`messages` must be an array of messages.",
                ));
            };
            if msgs.is_empty() || msgs.len() > limits.max_messages {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "`messages` must hold 1 to {} messages.",
                        limits.max_messages
                    ),
                ));
            }
            let mut bytes = 0;
            for m in msgs {
                let Some(role) = m.get("role").and_then(Value::as_str) else {
                    return Err(ApiError::invalid(
                        "messages",
                        "Every message needs a string `role`.",
                    ));
                };
                bytes += role.len() + m.get("content").map_or(0, text_bytes);
                // Tool calls are prompt text for the engine too.
                bytes += m.get("tool_calls").map_or(0, |t| t.to_string().len());
            }
            bytes += obj.get("tools").map_or(0, |t| t.to_string().len());
            (bytes, msgs.len())
        }
        Endpoint::Completions => match obj.get("prompt") {
            Some(Value::String(p)) => (p.len(), 1),
            Some(Value::Array(ps)) if ps.len() == 1 && ps[0].is_string() => (text_bytes(&ps[0]), 1),
            Some(Value::Array(_)) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "Only one prompt per request is supported.",
                ));
            }
            _ => return Err(ApiError::invalid("prompt", "`prompt` must be a string.")),
        },
    };
    // n > 1 would bill several completions under one receipt; refuse it clearly.
    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => return Err(ApiError::invalid("n", "Only n = 1 is supported.")),
    }
    let asked = obj
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()));
    let max_tokens = match asked {
        None => limits.default_max_tokens,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=limits.max_tokens).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "`max_tokens` must be an integer from 1 to {}.",
                        limits.max_tokens
                    ),
                ));
            }
        },
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean.")),
    };
    let include_usage = stream
        && obj
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);

    obj.insert("stream".into(), Value::Bool(true));
    let mut options = Map::new();
    options.insert("include_usage".into(), Value::Bool(true));
    obj.insert("stream_options".into(), Value::Object(options));
    obj.remove("max_completion_tokens");
    obj.insert("max_tokens".into(), Value::from(max_tokens));
    Ok(Validated {
        model,
        stream,
        include_usage,
        max_tokens,
        prompt_bytes,
        messages,
        engine_body: Value::Object(obj),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Validated, ApiError> {
        validate(
            Endpoint::Chat,
            body.to_string().as_bytes(),
            &Limits::default(),
        )
    }

    #[test]
    fn a_chat_request_is_validated_and_forced_to_stream() {
        let v = chat(json!({
            "model": "smollm2-135m",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 64,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "f"}}]
        }))
        .expect("valid");
        assert_eq!(
            (
                v.model.as_str(),
                v.stream,
                v.include_usage,
                v.max_tokens,
                v.messages
            ),
            ("smollm2-135m", false, false, 64, 2)
        );
        assert!(v.prompt_bytes > "systemBe brief.userHi".len());
        assert_eq!(v.engine_body["stream"], true);
        assert_eq!(v.engine_body["stream_options"]["include_usage"], true);
        assert_eq!(
            v.engine_body["response_format"]["type"], "json_object",
            "unknown fields pass through"
        );
        assert_eq!(v.engine_body["temperature"], 0);
    }

    #[test]
    fn bad_requests_get_openai_shaped_errors() {
        let e = validate(Endpoint::Chat, b"{nope", &Limits::default()).expect_err("malformed");
        assert_eq!(e.status, 400);
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        assert_eq!(
            chat(json!({"messages": []})).expect_err("no model").param,
            Some("model")
        );
        assert_eq!(
            chat(json!({"model": "m", "messages": []}))
                .expect_err("empty")
                .param,
            Some("messages")
        );
        assert_eq!(
            chat(json!({"model": "m", "messages": [{"content": "x"}]}))
                .expect_err("no role")
                .param,
            Some("messages")
        );
        for absurd in [
            json!(0),
            json!(-5),
            json!(1.5),
            json!(10_000_000),
            json!("many"),
        ] {
            let e = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": absurd})).expect_err("absurd");
            assert_eq!(e.param, Some("max_tokens"));
        }
        assert_eq!(
            chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}))
                .expect_err("n")
                .param,
            Some("n")
        );
        let e = ApiError::no_capacity(2);
        assert_eq!((e.status, e.retry_after_s), (503, Some(2)));
        assert_eq!(
            ApiError::model_not_found("x").body()["error"]["code"],
            "model_not_found"
        );
        let e = ApiError::model_unavailable("m", 2);
        assert_eq!((e.status, e.retry_after_s), (503, Some(2)));
        assert_eq!(e.body()["error"]["code"], "no_capacity");
        assert_eq!(e.body()["error"]["param"], "model");
    }

    #[test]
    fn streaming_and_completions() {
        let v = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true,
            "stream_options": {"include_usage": true}, "max_completion_tokens": 5}),
        )
        .expect("valid");
        assert!(v.stream && v.include_usage);
        assert_eq!(v.engine_body["max_tokens"], 5);
        assert!(v.engine_body.get("max_completion_tokens").is_none());
        let c = validate(
            Endpoint::Completions,
            br#"{"model":"m","prompt":"Once upon"}"#,
            &Limits::default(),
        )
        .expect("valid");
        assert_eq!((c.prompt_bytes, c.max_tokens), (9, 1024));
        assert!(
            validate(
                Endpoint::Completions,
                br#"{"model":"m","prompt":["a","b"]}"#,
                &Limits::default()
            )
            .is_err()
        );
    }
}
