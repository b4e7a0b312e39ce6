//! Workers that lie or fail, against the real coordinator. The worker here is a
//! scripted peer speaking the real protocol (a test double for our own logic;
//! the real engine path is e2e_llamacpp.rs). In every case no credit is lost:
//! the consumer pays at most for what it was streamed, and no hold stays open.

mod common;

use common::harness::{account, consumer, start_in_process, wait_for, wait_for_models};
use common::scripted::{MODEL, Script};
use serde_json::json;
use troop_coordinator::config::{Config, PriceConfig};
use troop_coordinator::domain::ratelimit::RateLimits;

const ADMIN: &str = "faults-admin";
const GRANT: u64 = 1_000_000;

fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        admin_token: ADMIN.into(),
        heartbeat_interval_ms: 1_000,
        first_byte_deadline_ms: 5_000,
        prices: vec![PriceConfig {
            model: MODEL.into(),
            input_micro_per_1k: 1_000,
            output_micro_per_1k: 10_000,
        }],
        ..Config::default()
    }
}

/// Posts a chat completion with `key`; the response whatever its status.
fn chat_response(url: &str, key: &str, body: serde_json::Value) -> ureq::Response {
    match ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(body)
    {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport: {e}"),
    }
}

/// [`chat_response`]'s status and body.
fn chat(url: &str, key: &str, body: serde_json::Value) -> (u16, String) {
    let r = chat_response(url, key, body);
    (r.status(), r.into_string().unwrap_or_default())
}

/// Waits until the account of `key` has no open hold (settlement may finish
/// just after its stream).
fn wait_settled(url: &str, key: &str) {
    wait_for("settlement", || {
        account(url, key)["holds"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

fn balance(url: &str, key: &str) -> u64 {
    account(url, key)["balance_micro"]
        .as_str()
        .expect("balance")
        .parse()
        .expect("number")
}

/// Runs one scripted job; returns (streamed text, balance after, open holds after).
fn run(script: Script) -> (String, u64, usize) {
    let (status, text, balance, holds, _) = run_with(script, |_| {});
    assert_eq!(status, 200, "the stream starts: {text}");
    (text, balance, holds)
}

/// [`run`] with the test settings changed by `tweak`, for any outcome:
/// (HTTP status, body, balance after, open holds after, coordinator URL).
fn run_with(script: Script, tweak: impl FnOnce(&mut Config)) -> (u16, String, u64, usize, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = config(dir.path());
    tweak(&mut settings);
    let url = start_in_process(settings);
    let (_, key) = consumer(&url, ADMIN, GRANT);
    let worker = common::scripted::spawn(url.clone(), script);
    wait_for_models(&url);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": true});
    let (status, text) = chat(&url, &key, body);
    if !matches!(script, Script::Stall) {
        // A stalling worker never ends by itself; the others do.
        worker.join().expect("worker");
    }
    wait_settled(&url, &key);
    let acct = account(&url, &key);
    let balance = acct["balance_micro"]
        .as_str()
        .expect("balance")
        .parse()
        .expect("number");
    (
        status,
        text,
        balance,
        acct["holds"].as_array().expect("holds").len(),
        url,
    )
}

#[test]
fn an_inflating_worker_is_paid_for_what_it_streamed() {
    let (text, balance, holds) = run(Script::Inflate);
    assert!(text.contains("Hello") && text.contains("friend"), "{text}");
    assert_eq!(holds, 0);
    // 3 streamed tokens at 10,000 µc/1k (⌈30⌉) + at most 10 prompt tokens at 1,000/1k (⌈10⌉) — not 1,000 tokens.
    let paid = GRANT - balance;
    assert!(paid > 0 && paid <= 40, "paid {paid}");
}

#[test]
fn a_forged_receipt_earns_nothing_and_costs_the_consumer_nothing() {
    let (text, balance, holds) = run(Script::Forge);
    assert!(text.contains("Hello"), "{text}");
    assert_eq!((balance, holds), (GRANT, 0));
}

#[test]
fn a_worker_vanishing_mid_stream_leaves_no_hold_and_no_charge() {
    let (_, balance, holds) = run(Script::Vanish);
    assert_eq!((balance, holds), (GRANT, 0));
}

#[test]
fn a_priced_model_no_worker_serves_is_503_with_retry_after_and_an_unpriced_one_404() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(config(dir.path()));
    let (_, key) = consumer(&url, ADMIN, GRANT);
    let ask = |model: &str| {
        chat_response(
            &url,
            &key,
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    // Workers come and go (one moving between nodes): worth asking again.
    let offline = ask(MODEL);
    assert_eq!(offline.status(), 503);
    let retry: u64 = offline
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    let err: serde_json::Value = offline.into_json().expect("json");
    assert_eq!(err["error"]["code"], "no_capacity");
    assert_eq!(err["error"]["param"], "model");
    // A model with no price does not exist here: not worth asking again.
    let unknown = ask("no-such-model");
    assert_eq!(unknown.status(), 404);
    assert!(unknown.header("retry-after").is_none());
    let err: serde_json::Value = unknown.into_json().expect("json");
    assert_eq!(err["error"]["code"], "model_not_found");
    assert_eq!(balance(&url, &key), GRANT, "nothing charged");
    wait_settled(&url, &key);
}

#[test]
fn an_account_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(Config {
        rate_limits: RateLimits {
            requests_per_minute: 1,
            burst: 2,
            max_in_flight: 0,
        },
        ..config(dir.path())
    });
    let (_, hammer) = consumer(&url, ADMIN, GRANT);
    let (_, calm) = consumer(&url, ADMIN, GRANT);
    // (status, Retry-After, body) of one request.
    let call = |key: &str| -> (u16, Option<String>, serde_json::Value) {
        let resp = chat_response(
            &url,
            key,
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
        );
        let retry = resp.header("retry-after").map(str::to_owned);
        (resp.status(), retry, resp.into_json().unwrap_or_default())
    };
    for _ in 0..2 {
        assert_eq!(
            call(&hammer).0,
            404,
            "within the burst the request goes on (to an unknown model)"
        );
    }
    let (status, retry, err) = call(&hammer);
    assert_eq!(status, 429);
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert_eq!(call(&calm).0, 404, "another account has its own bucket");
}

#[test]
fn garbage_after_the_first_token_ends_the_stream_with_an_error_and_bills_only_what_was_streamed() {
    let (text, balance, holds) = run(Script::Garbage);
    assert!(text.contains("Hello"), "the good token arrived: {text}");
    assert!(
        text.contains("\"error\""),
        "the stream ends with an OpenAI-style error event: {text}"
    );
    assert_eq!(holds, 0);
    // The receipt claimed 1,000 output tokens (10,000 micro-credits); one
    // token and the prompt were streamed.
    let charged = GRANT - balance;
    assert!(charged < 1_000, "charged {charged}");
}

#[test]
fn an_oversized_frame_cuts_the_worker_off_and_costs_nothing() {
    let (status, text, balance, holds, _) = run_with(Script::Oversized, |_| {});
    assert_eq!(status, 503, "no other worker to retry on: {text}");
    assert!(text.contains("no_capacity"), "{text}");
    assert_eq!((balance, holds), (GRANT, 0));
}

#[test]
fn a_worker_that_never_finishes_is_cut_at_the_job_deadline() {
    let (text, balance, holds) = {
        let (status, text, balance, holds, url) =
            run_with(Script::Stall, |c| c.job_deadline_ms = 1_500);
        assert_eq!(status, 200, "{text}");
        // The stalling worker is still connected: its history shows the job
        // it started and failed, from the event log's worker events.
        let workers = common::harness::admin_get(&url, ADMIN, "/admin/workers");
        let history = &workers["workers"][0]["history"];
        assert_eq!(
            (
                history["jobs_started"].as_u64(),
                history["jobs_failed"].as_u64()
            ),
            (Some(1), Some(1)),
            "{workers}"
        );
        (text, balance, holds)
    };
    assert!(text.contains("\"error\""), "{text}");
    assert_eq!(holds, 0);
    assert_eq!(balance, GRANT, "a third of a token is no token");
}

#[test]
fn a_worker_that_streams_past_the_job_deadline_is_cut_cancelled_and_paid_for_what_was_delivered() {
    // A token every 50 ms for up to 10 s; the job may take 1 s.
    let (status, text, balance, holds, _) =
        run_with(Script::UntilCancelled, |c| c.job_deadline_ms = 1_000);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("passed its deadline"), "{text}");
    assert!(
        text.contains("troop_receipt") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    // run_with joined the worker, which asserts it was told to cancel.
    assert_eq!(holds, 0);
    let paid = GRANT - balance;
    assert!(paid > 0, "what was delivered is paid for");
}

#[test]
fn a_non_streamed_answer_carries_the_tool_calls_put_together_and_bills_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(config(dir.path()));
    let (_, key) = consumer(&url, ADMIN, GRANT);
    let worker = common::scripted::spawn(url.clone(), Script::ToolCall);
    wait_for_models(&url);
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "max_tokens": 50,
    });
    let answer: serde_json::Value = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(body)
        .expect("answered")
        .into_json()
        .expect("json");
    worker.join().expect("worker");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    assert!(choice["message"]["content"].is_null(), "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(
        (
            call["id"].as_str(),
            call["type"].as_str(),
            call["function"]["name"].as_str()
        ),
        (Some("call_1"), Some("function"), Some("get_weather"))
    );
    assert_eq!(call["function"]["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(
        answer["usage"]["completion_tokens"], 3,
        "the call's three pieces are billed, not the worker's claim of 1,000"
    );
    wait_settled(&url, &key);
}

#[test]
fn a_consumer_that_stops_reading_loses_its_job_not_the_workers_other_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(Config {
        slow_consumer_ms: 1_000,
        ..config(dir.path())
    });
    let (_, stalled_key) = consumer(&url, ADMIN, GRANT);
    let (_, key) = consumer(&url, ADMIN, GRANT);
    let worker = common::scripted::spawn(url.clone(), Script::Flood);
    wait_for_models(&url);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": true});
    let stalled = {
        let (url, key, body) = (url.clone(), stalled_key.clone(), body.clone());
        std::thread::spawn(move || {
            let resp = ureq::post(&format!("{url}/v1/chat/completions"))
                .set("authorization", &format!("Bearer {key}"))
                .send_json(body)
                .expect("the flood starts");
            // Holds the connection open and reads nothing.
            std::thread::sleep(std::time::Duration::from_secs(8));
            drop(resp);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let text = ureq::post(&format!("{url}/v1/chat/completions"))
        .timeout(std::time::Duration::from_secs(30))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(body)
        .expect("the second job is served")
        .into_string()
        .expect("the second job streams to its end");
    assert!(
        text.contains("friend") && text.contains("troop_receipt"),
        "{text}"
    );
    worker.join().expect("worker");
    stalled.join().expect("stalled consumer");
    wait_for("the stalled job's hold to go", || {
        account(&url, &stalled_key)["holds"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

#[test]
fn a_consumer_that_disconnects_cancels_the_job_and_pays_only_for_what_was_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(config(dir.path()));
    let (_, key) = consumer(&url, ADMIN, GRANT);
    let worker = common::scripted::spawn(url.clone(), Script::UntilCancelled);
    wait_for_models(&url);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": true});
    let resp = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(body)
        .expect("the stream starts");
    // The consumer hangs up after three tokens.
    let receipt = common::scripted::hang_up_after(resp, 3);
    // The worker asserts that it was told to cancel.
    worker.join().expect("the worker was cancelled");
    wait_settled(&url, &key);
    let settled = ureq::get(&format!("{url}/v1/receipts/{receipt}"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .expect("the delivered part is settled and receipted")
        .into_json::<serde_json::Value>()
        .expect("json");
    let billed = settled["receipt"]["billed_output_tokens"]
        .as_u64()
        .expect("billed output tokens");
    let charged = settled["charged_micro"].as_u64().expect("charged");
    assert!(charged > 0, "what was delivered is paid for: {settled}");
    assert!(
        billed >= 3
            && billed < u64::try_from(common::scripted::UNTIL_CANCELLED_MAX).expect("small"),
        "billed {billed}: at least what the consumer read, less than the whole answer"
    );
    assert_eq!(
        balance(&url, &key),
        GRANT - charged,
        "the balance moved by exactly the receipt"
    );
}

#[test]
fn one_key_hammering_at_once_never_holds_more_than_its_balance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(Config {
        job_deadline_ms: 3_000,
        ..config(dir.path())
    });
    // A 1,000-token hold costs 10,000 micro-credits of output plus a little
    // for the prompt: five fit in 55,000, a sixth does not.
    let (_, key) = consumer(&url, ADMIN, 55_000);
    let _worker = common::scripted::spawn(url.clone(), Script::Stall);
    wait_for_models(&url);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": true});
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let (url, key, body, barrier) =
                (url.clone(), key.clone(), body.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                chat(&url, &key, body)
            })
        })
        .collect();
    let outcomes: Vec<(u16, String)> = requests
        .into_iter()
        .map(|r| r.join().expect("request thread"))
        .collect();
    let served = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = outcomes.iter().filter(|(s, _)| *s == 402).collect();
    assert_eq!((served, refused.len()), (5, 11), "{outcomes:?}");
    assert!(
        refused
            .iter()
            .all(|(_, b)| b.contains("insufficient_quota")),
        "{refused:?}"
    );
    wait_settled(&url, &key);
    let acct = account(&url, &key);
    assert_eq!(
        acct["balance_micro"], "55000",
        "nothing delivered, nothing charged: {acct}"
    );
}

#[test]
fn idle_account_actors_retire_and_a_fresh_one_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = start_in_process(Config {
        account_idle_check_ms: 100,
        ..config(dir.path())
    });
    let metrics = || {
        ureq::get(&format!("{url}/metrics"))
            .call()
            .expect("metrics")
            .into_string()
            .expect("text")
    };
    let (acct, key) = consumer(&url, ADMIN, GRANT);
    let worker = common::scripted::spawn(url.clone(), Script::Inflate);
    wait_for_models(&url);
    let (status, _) = chat(
        &url,
        &key,
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}),
    );
    assert_eq!(status, 200);
    worker.join().expect("worker");
    wait_for("the idle account's actor to retire", || {
        metrics().contains("troop_accounts_active 0")
    });
    let before = balance(&url, &key);
    // A change of the account after its actor retired goes through a fresh one.
    common::harness::admin(
        &url,
        ADMIN,
        "/admin/grants",
        json!({"account": acct, "amount_micro": 7}),
    );
    let after = balance(&url, &key);
    assert_eq!(after, before + 7);
    assert!(before < GRANT, "the first request was billed");
}
