//! A request on one cluster node served by a worker connected to another
//! (noida-db + Postgres, two in-process nodes): node A has no worker, so it
//! relays the job to node B, whose worker's bytes come back through A, which
//! meters them, countersigns the receipt and settles. A consumer that hangs
//! up on A stops the worker on B, and pays for what was delivered only.

mod common;

use common::harness::{consumer, wait_for};
use common::nodes::{ADMIN, SECRET, get, inflated_chat, shared_keys, start_node};
use common::scripted::{MODEL, Script, UNTIL_CANCELLED_MAX};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const GRANT: u64 = 1_000_000;

/// Waits until node `url` offers `MODEL` (from another node's presence)
/// while `worker` runs; a timeout says what the nodes had published.
fn wait_offered(
    url: &str,
    key: &str,
    worker: &std::thread::JoinHandle<()>,
    published: impl Fn() -> String,
) {
    let start = Instant::now();
    loop {
        let models = get(url, key, "/v1/models");
        if models.as_ref().is_ok_and(|m| {
            m["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|e| e["id"] == MODEL))
        }) {
            return;
        }
        assert!(
            !worker.is_finished(),
            "the worker ended before its model was offered through the other node (its panic is above)"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the model was not offered through the other node in 30 s: /v1/models {models:?}; {}",
            published()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What every node published, for a failure's message.
async fn published(client: &tokio_postgres::Client) -> String {
    // Each row as one line of text, ages by the database's clock.
    let now = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
    let mut said = String::new();
    for (table, columns) in [
        (
            "worker_presence",
            format!("node, model, workers, free_slots, {now} - updated_ms"),
        ),
        ("nodes", format!("node, internal_url, {now} - last_seen_ms")),
    ] {
        let rows = client
            .query(
                &format!("select concat_ws(' ', {columns}) from {table}"),
                &[],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            });
        said += &format!("{table} ({columns}): {rows:?}; ");
    }
    said
}

/// Waits for the account's holds to be settled; its balance then.
fn settled_balance(url: &str, key: &str) -> u64 {
    let mut balance = 0;
    wait_for("the settlement", || {
        get(url, key, "/v1/account").is_ok_and(|v| {
            balance = v["balance_micro"]
                .as_str()
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            v["holds"].as_array().is_some_and(Vec::is_empty)
        })
    });
    balance
}

fn receipt(url: &str, key: &str, job: &str) -> Value {
    let mut receipt = Value::Null;
    wait_for("the receipt", || {
        get(url, key, &format!("/v1/receipts/{job}")).is_ok_and(|r| {
            receipt = r;
            true
        })
    });
    receipt
}

/// `/admin/workers` on node A lists node B's worker, tagged with node B, and
/// names a live node that does not answer; node B's internal list needs the
/// cluster's secret.
fn workers_listed_on_any_node(
    a: &str,
    b: &str,
    runtime: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
) {
    assert_eq!(
        get(b, "not the cluster secret", "/internal/v1/workers"),
        Err(401),
        "a node's internal list without the secret"
    );
    let theirs = get(b, SECRET, "/internal/v1/workers").expect("node B's internal list");
    assert_eq!(
        theirs["workers"].as_array().map(Vec::len),
        Some(1),
        "{theirs}"
    );

    let listed = get(a, ADMIN, "/admin/workers").expect("the admin list");
    assert_eq!(listed["complete"], true, "{listed}");
    let workers = listed["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 1, "{listed}");
    assert_eq!(workers[0]["node"], "node-b", "{listed}");
    assert_eq!(workers[0]["models"][0], MODEL, "{listed}");
    assert_eq!(
        listed["nodes"],
        json!([{"node": "node-a", "workers": 0}, {"node": "node-b", "workers": 1}]),
    );

    // A node that advertises itself but does not answer (nothing listens on
    // port 1) is named, and the list says it is not complete.
    let listed = {
        let mut listed = Value::Null;
        wait_for("the silent node to be named", || {
            runtime
                .block_on(client.execute(
                    "insert into nodes (node, internal_url, incarnation, last_seen_ms)
                     values ('node-c', 'http://127.0.0.1:1', 'node-c/0',
                             (extract(epoch from clock_timestamp()) * 1000)::bigint)
                     on conflict (node) do update set last_seen_ms = excluded.last_seen_ms",
                    &[],
                ))
                .expect("advertise node C");
            listed = get(a, ADMIN, "/admin/workers").expect("the admin list");
            listed["nodes"].as_array().is_some_and(|n| n.len() == 3)
        });
        listed
    };
    assert_eq!(listed["complete"], false, "{listed}");
    assert_eq!(listed["nodes"][2]["node"], "node-c", "{listed}");
    assert!(listed["nodes"][2]["error"].is_string(), "{listed}");
    assert_eq!(listed["workers"][0]["node"], "node-b", "{listed}");
    runtime
        .block_on(client.execute("delete from nodes where node = 'node-c'", &[]))
        .expect("node C gone");
}

#[test]
fn a_request_on_one_node_is_served_by_a_worker_on_another() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_db, _broker, cluster, client) = runtime.block_on(common::cluster::cluster("relay", 4));
    let dirs = shared_keys(2);
    let a = start_node("node-a", dirs[0].path(), &cluster);
    let b = start_node("node-b", dirs[1].path(), &cluster);
    let (_, key) = consumer(&a, ADMIN, GRANT);

    // The only worker is on node B; node A learns of it from B's presence.
    let worker = common::scripted::spawn(b.clone(), Script::Inflate);
    let published = || runtime.block_on(published(&client));
    wait_offered(&a, &key, &worker, published);
    let presence = runtime
        .block_on(client.query_one(
            "select workers, free_slots from worker_presence where node = 'node-b' and model = $1",
            &[&MODEL],
        ))
        .expect("node B's presence");
    assert_eq!(presence.get::<_, i32>(0), 1, "one worker on node B");
    assert!(presence.get::<_, i32>(1) > 0, "with room");
    workers_listed_on_any_node(&a, &b, &runtime, &client);

    // Node A counted what it streamed: three tokens, not the thousand claimed.
    let job = inflated_chat(
        &a,
        &key,
        "a chat completion through node A, served on node B",
    );
    worker.join().expect("worker");
    let settled = receipt(&a, &key, &job);
    let charged = settled["charged_micro"].as_u64().expect("charged");
    assert!(charged > 0, "{settled}");
    assert_eq!(settled["receipt"]["billed_output_tokens"], 3, "{settled}");
    let worker_id = troop_schemas::WorkerId::from_key(&troop_schemas::PublicKey(
        ed25519_dalek::SigningKey::from_bytes(&[42; 32])
            .verifying_key()
            .to_bytes(),
    ));
    assert_eq!(
        settled["receipt"]["receipt"]["worker"],
        worker_id.to_string(),
        "paid to the worker on node B: {settled}"
    );
    assert_eq!(settled_balance(&a, &key), GRANT - charged);

    // A streamed answer, the consumer hanging up on node A after three
    // tokens: the worker on node B is told to stop (it panics otherwise)
    // and its receipt for what it streamed comes back through the relay.
    let offered_by_b = |free: &str| {
        runtime
            .block_on(client.query_opt(
                &format!("select 1 from worker_presence where node = 'node-b' and {free}"),
                &[],
            ))
            .expect("query")
            .is_some()
    };
    wait_for("node B to withdraw its first worker", || {
        !offered_by_b("true")
    });
    let worker = common::scripted::spawn(b.clone(), Script::UntilCancelled);
    wait_for("node B to offer its new worker", || {
        offered_by_b("free_slots > 0")
    });
    wait_offered(&a, &key, &worker, published);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": true});
    let resp = ureq::post(&format!("{a}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(body)
        .expect("the stream starts");
    let job = common::scripted::hang_up_after(resp, 3);
    worker.join().expect("the worker on node B was cancelled");
    let settled = receipt(&a, &key, &job);
    let billed = settled["receipt"]["billed_output_tokens"]
        .as_u64()
        .expect("billed output tokens");
    let charged_again = settled["charged_micro"].as_u64().expect("charged");
    assert!(
        billed >= 3 && billed < u64::try_from(UNTIL_CANCELLED_MAX).expect("small"),
        "billed {billed}: at least what the consumer read, less than the whole answer"
    );
    assert_eq!(
        settled_balance(&a, &key),
        GRANT - charged - charged_again,
        "the balance moved by exactly the two receipts"
    );
}
