//! `troop-loadtest engine`: a mock OpenAI-compatible inference engine that
//! streams synthetic tokens at a set rate. It is the baseline the coordinator
//! is measured against (reached directly, then through coordinator and agent)
//! and the engine behind simulated workers. Not a model: every token is " tok".

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context as _, Result};
use bytes::Bytes;
use serde_json::{Value, json};

/// No synthetic answer is longer than this, whatever `max_tokens` says.
const MAX_TOKENS: u64 = 1 << 16;
const MAX_BODY_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// The one model the engine lists.
    #[arg(long, default_value = "mock")]
    pub model: String,
    /// Time before each token in milliseconds (0: as fast as it can).
    #[arg(long, default_value_t = 5)]
    pub token_interval_ms: u64,
    /// Tokens per answer when the request sets no `max_tokens`.
    #[arg(long, default_value_t = 64)]
    pub default_tokens: u64,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, Clone)]
struct Settings {
    model: String,
    interval: Duration,
    default_tokens: u64,
}

/// Binds and starts serving; the server runs until its handle is stopped or
/// the process ends. Call from inside an actix system.
pub fn start(args: &EngineArgs) -> Result<(SocketAddr, actix_web::dev::ServerHandle)> {
    let settings = Settings {
        model: args.model.clone(),
        interval: Duration::from_millis(args.token_interval_ms),
        default_tokens: args.default_tokens,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(settings.clone()))
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .route(
                "/health",
                web::get().to(|| async { HttpResponse::Ok().json(json!({"status": "ok"})) }),
            )
            .route("/v1/models", web::get().to(models))
            .route("/v1/chat/completions", web::post().to(chat))
            .route("/v1/completions", web::post().to(completions))
    })
    .workers(args.threads.max(1))
    .disable_signals()
    .bind(&args.listen)
    .with_context(|| format!("binding {}", args.listen))?;
    let addr = *server.addrs().first().context("no address bound")?;
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok((addr, handle))
}

async fn models(s: web::Data<Settings>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": [{"id": s.model, "object": "model", "owned_by": "troop-loadtest", "max_model_len": 4096}],
    }))
}

async fn chat(s: web::Data<Settings>, body: Bytes) -> HttpResponse {
    answer(&s, &body, true)
}

async fn completions(s: web::Data<Settings>, body: Bytes) -> HttpResponse {
    answer(&s, &body, false)
}

fn bad_request(why: &str) -> HttpResponse {
    HttpResponse::BadRequest()
        .json(json!({"error": {"message": why, "type": "invalid_request_error"}}))
}

/// One synthetic answer: `max_tokens` tokens of " tok", streamed one event per
/// token after `interval` each, or whole.
fn answer(s: &Settings, body: &[u8], chat: bool) -> HttpResponse {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return bad_request("body is not JSON");
    };
    let tokens = req["max_tokens"]
        .as_u64()
        .or_else(|| req["max_completion_tokens"].as_u64())
        .unwrap_or(s.default_tokens)
        .min(MAX_TOKENS);
    // Engines count prompt tokens with their tokenizer; ~4 bytes a token here.
    let prompt_tokens = u64::try_from(body.len() / 4).unwrap_or(u64::MAX);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens});
    let (id, object) = if chat {
        ("chatcmpl-mock", "chat.completion")
    } else {
        ("cmpl-mock", "text_completion")
    };
    if !req["stream"].as_bool().unwrap_or(false) {
        let text = " tok".repeat(usize::try_from(tokens).unwrap_or(0));
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        return HttpResponse::Ok().json(json!({"id": id, "object": object, "created": 0, "model": s.model, "choices": [choice], "usage": usage}));
    }
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        object
    };
    let event = |choice: Value| -> Bytes {
        let c = json!({"id": id, "object": chunk_object, "created": 0, "model": s.model, "choices": [choice]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let token = if chat {
        event(json!({"index": 0, "delta": {"content": " tok"}, "finish_reason": null}))
    } else {
        event(json!({"index": 0, "text": " tok", "finish_reason": null}))
    };
    let mut tail = vec![if chat {
        event(json!({"index": 0, "delta": {}, "finish_reason": "length"}))
    } else {
        event(json!({"index": 0, "text": "", "finish_reason": "length"}))
    }];
    if req["stream_options"]["include_usage"].as_bool() == Some(true) {
        let c = json!({"id": id, "object": chunk_object, "created": 0, "model": s.model, "choices": [], "usage": usage});
        tail.push(Bytes::from(format!("data: {c}\n\n")));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let interval = s.interval;
    let stream = futures_util::stream::unfold((0u64, tail.into_iter()), move |(sent, mut tail)| {
        let token = token.clone();
        async move {
            if sent < tokens {
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                return Some((Ok::<_, std::convert::Infallible>(token), (sent + 1, tail)));
            }
            let next = tail.next()?;
            Some((Ok(next), (sent, tail)))
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(stream)
}

/// `troop-loadtest engine`: serve until killed.
pub fn run(args: &EngineArgs) -> Result<()> {
    actix_web::rt::System::new().block_on(async {
        let (addr, _handle) = start(args)?;
        println!("listening on {addr}");
        std::future::pending::<()>().await;
        Ok(())
    })
}
