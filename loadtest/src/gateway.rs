//! `troop-loadtest gateway`: C concurrent streaming consumers against any
//! OpenAI-compatible URL. Prints time-to-first-token and latency percentiles,
//! requests/s and tokens/s as one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use futures_util::StreamExt as _;
use serde_json::json;
use troop_schemas::sse::Meter;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Base URL of the API (the part before `/v1`).
    #[arg(long)]
    pub url: String,
    /// Bearer token; several, comma-separated, spread the consumers over them
    /// (consumer i uses key i mod n), e.g. one account per consumer.
    #[arg(long, env = "TROOP_API_KEY", default_value = "", value_delimiter = ',')]
    pub key: Vec<String>,
    #[arg(long)]
    pub model: String,
    /// Concurrent consumers.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in all (bounded, so the run stops by itself).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u64,
    /// Give up on the run after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

#[derive(Debug, Default)]
struct Sample {
    ttft_ms: f64,
    total_ms: f64,
    tokens: u64,
    /// Why the request failed, if it did.
    error: Option<String>,
}

fn failed(why: impl Into<String>) -> Sample {
    Sample {
        error: Some(why.into()),
        ..Sample::default()
    }
}

async fn one(client: &reqwest::Client, args: &GatewayArgs, key: &str) -> Sample {
    let body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "Write a short poem about sharing."}],
        "max_tokens": args.max_tokens,
        "stream": true,
    });
    let started = Instant::now();
    let mut req = client
        .post(format!(
            "{}/v1/chat/completions",
            args.url.trim_end_matches('/')
        ))
        .json(&body);
    if !key.is_empty() {
        req = req.bearer_auth(key);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return failed(format!("send: {e}")),
    };
    if !resp.status().is_success() {
        return failed(format!("status {}", resp.status().as_u16()));
    }
    let mut meter = Meter::new();
    let mut ttft = None;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return failed(format!("stream: {e}")),
        };
        if let Err(e) = meter.feed(&chunk) {
            return failed(format!("event stream: {e}"));
        }
        if ttft.is_none() {
            ttft = Some(started.elapsed());
        }
    }
    let reading = meter.finish();
    Sample {
        ttft_ms: ttft.unwrap_or_default().as_secs_f64() * 1e3,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        tokens: reading.deltas,
        error: match (reading.done, reading.error) {
            (_, Some(e)) => Some(e),
            (false, None) => Some("stream ended without [DONE]".into()),
            (true, None) => None,
        },
    }
}

/// Nearest-rank percentile of sorted samples; `p` in whole percent.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p.min(100) * (sorted.len() - 1) + 50) / 100;
    sorted[rank]
}

pub async fn run(args: GatewayArgs) -> Result<serde_json::Value> {
    ensure!(
        args.concurrency > 0 && args.requests > 0,
        "need at least one consumer and one request"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        // A new connection per request: engines such as llama.cpp close idle
        // keep-alive connections, and a request sent on one that is closing
        // fails on the client side, which is not the server's failure.
        .pool_max_idle_per_host(0)
        .build()
        .context("http client")?;
    let args = Arc::new(args);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for consumer in 0..args.concurrency {
        let (client, args, next) = (client.clone(), Arc::clone(&args), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let key = args
                .key
                .get(consumer % args.key.len().max(1))
                .map_or("", String::as_str);
            let mut samples = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < args.requests {
                samples.push(one(&client, &args, key).await);
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.context("consumer task")?);
    }
    let wall = started.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for e in samples.iter().filter_map(|s| s.error.clone()) {
        *errors.entry(e).or_default() += 1;
    }
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft_ms).collect();
    let mut total: Vec<f64> = ok.iter().map(|s| s.total_ms).collect();
    ttft.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
    Ok(json!({
        "requests": samples.len(),
        "ok": ok.len(),
        "failed": samples.len() - ok.len(),
        "errors": errors,
        "concurrency": args.concurrency,
        "keys": args.key.iter().filter(|k| !k.is_empty()).count(),
        "wall_s": wall,
        "requests_per_s": ok.len() as f64 / wall,
        "tokens_per_s": tokens as f64 / wall,
        "ttft_ms": {"p50": percentile(&ttft, 50), "p90": percentile(&ttft, 90), "p99": percentile(&ttft, 99)},
        "latency_ms": {"p50": percentile(&total, 50), "p90": percentile(&total, 90), "p99": percentile(&total, 99)},
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(
            (
                super::percentile(&s, 50),
                super::percentile(&s, 99),
                super::percentile(&s, 100)
            ),
            (51.0, 99.0, 100.0)
        );
        assert_eq!(super::percentile(&[], 50), 0.0);
    }
}
