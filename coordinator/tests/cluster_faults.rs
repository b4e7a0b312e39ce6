//! Faults on a three-node cluster of `troop-coordinator node` processes on
//! noida-db and Postgres. `kill -9` a node with requests in flight: the
//! requests it held die with it, the holds they placed are voided by their
//! account's owner once the node stops advertising itself, nothing settled
//! before is lost, nothing is charged twice, `troop-audit verify` accepts
//! the cluster's `/ledger/` since a checkpoint taken before the fault, and a
//! replay of Kafka reproduces the live projections. And a real `troop-agent`
//! in front of a real llama.cpp server, whose node is killed, is back on
//! another node within seconds, serving requests relayed from the third.

mod common;
#[path = "../../worker-agent/tests/common/model_server.rs"]
mod model_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::harness::{Coordinator, LogsOnPanic, consumer, start_binary, wait_for, wait_for_up_to};
use common::nodes::{ADMIN, SECRET, get, shared_keys};
use common::scripted::{MODEL, Script};
use serde_json::{Value, json};
use troop_coordinator::cluster::{owner, replay};
use troop_coordinator::config::ClusterConfig;
use troop_coordinator::money::Home;
use troop_ledger::note::NoteSigner;
use troop_schemas::AccountId;

const GRANT: u64 = 1_000_000;
const IN_FLIGHT: usize = 3;
const PARTITIONS: u32 = 4;
/// The model the real llama.cpp server serves (ops/llama_server.py's alias).
const REAL_MODEL: &str = "smollm2-135m";

/// Starts node `name` as a process on `dir` (holding the network's keys).
fn start(name: &str, dir: &std::path::Path, cluster: &ClusterConfig) -> Coordinator {
    let config = dir.join("troop.toml");
    std::fs::write(
        &config,
        format!(
            "admin_token = \"{ADMIN}\"\nheartbeat_interval_ms = 1000\n\
             [[prices]]\nmodel = \"{MODEL}\"\ninput_micro_per_1k = 1000\noutput_micro_per_1k = 10000\n\
             [[prices]]\nmodel = \"{REAL_MODEL}\"\ninput_micro_per_1k = 1000\noutput_micro_per_1k = 3000\n\
             [cluster]\nkafka_brokers = \"{}\"\npostgres = \"{}\"\ntopic_prefix = \"{}\"\n\
             ledger_partitions = {}\nworker_partitions = 1\nreplication_factor = 1\nsecret = \"{SECRET}\"\n",
            cluster.kafka_brokers, cluster.postgres, cluster.topic_prefix, cluster.ledger_partitions,
        ),
    )
    .expect("config");
    let data = dir.to_str().expect("utf-8 path");
    let node = start_binary(
        &config,
        &[
            "node",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--data-dir",
            data,
        ],
    );
    wait_for("the node", || {
        ureq::get(&format!("{}/v1/models", node.1)).call().is_ok()
    });
    node
}

fn balance(account: &Value) -> u64 {
    account["balance_micro"]
        .as_str()
        .and_then(|b| b.parse().ok())
        .expect("balance")
}

/// Which node owns each ledger partition, once the owners' group has given
/// every one of `nodes` nodes a share of the partitions.
async fn owners(client: &tokio_postgres::Client, nodes: usize) -> BTreeMap<u32, String> {
    for _ in 0..600 {
        let owners: BTreeMap<u32, String> = client
            .query("select partition_id, node from partition_owners", &[])
            .await
            .expect("owners")
            .iter()
            .map(|r| (u32::try_from(r.get::<_, i32>(0)).expect("≥ 0"), r.get(1)))
            .collect();
        let holders: BTreeSet<&String> = owners.values().collect();
        if owners.len() == PARTITIONS as usize && holders.len() == nodes {
            return owners;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the owners' group never shared the partitions among the nodes");
}

/// A node that owns none of `homes`' partitions: the one to kill, since a
/// dead owner's partitions move only when the broker expires its group
/// session, which noida-db 0.2.3 never does (CLUSTER.md, failures).
fn victim_of(names: &[&str], owners: &BTreeMap<u32, String>, homes: &[Home]) -> usize {
    let busy: Vec<&String> = homes
        .iter()
        .map(|h| &owners[&owner::partition_of_home(*h, PARTITIONS)])
        .collect();
    names
        .iter()
        .rposition(|n| !busy.iter().any(|b| b.as_str() == *n))
        .expect("three nodes, at most two of them busy")
}

/// The two nodes other than `victim`.
fn survivors(victim: usize) -> (usize, usize) {
    match victim {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    }
}

/// Three node processes on one broker and database, with what a test asks
/// of them. Dropping it kills what is still running.
struct ThreeNodes {
    nodes: Vec<Option<Coordinator>>,
    names: [&'static str; 3],
    client: tokio_postgres::Client,
    cluster: ClusterConfig,
    _logs: LogsOnPanic,
    dirs: Vec<tempfile::TempDir>,
    db: common::services::Database,
    _broker: common::services::Broker,
    runtime: tokio::runtime::Runtime,
}

impl ThreeNodes {
    fn start(prefix: &str) -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (db, broker, cluster, client) =
            runtime.block_on(common::cluster::cluster(prefix, PARTITIONS));
        let dirs = shared_keys(3);
        let logs = LogsOnPanic(dirs.iter().map(|d| d.path().join("troop.log")).collect());
        let names = ["node-0", "node-1", "node-2"];
        let nodes = names
            .iter()
            .zip(&dirs)
            .map(|(name, dir)| Some(start(name, dir.path(), &cluster)))
            .collect();
        Self {
            nodes,
            names,
            client,
            cluster,
            _logs: logs,
            dirs,
            db,
            _broker: broker,
            runtime,
        }
    }

    fn url(&self, i: usize) -> String {
        self.nodes[i].as_ref().expect("alive").1.clone()
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    /// A node owning none of `homes`' partitions, and the other two.
    fn victim(&self, homes: &[Home]) -> (usize, (usize, usize)) {
        let owners = self
            .runtime
            .block_on(owners(&self.client, self.names.len()));
        let victim = victim_of(&self.names, &owners, homes);
        (victim, survivors(victim))
    }

    /// `troop-audit verify --since` an earlier checkpoint accepts the
    /// cluster's `/ledger/` (through `via`), with no hold left open and the
    /// consumer's balance at `balance`; a replay of Kafka into a fresh
    /// database rebuilds the same projections as the live ones.
    fn audit_and_replay(&self, via: &str, since: &str, consumer: &AccountId, balance: u64) {
        let log_key = troop_coordinator::cluster::node::shared_secret(
            &self.dirs[0].path().join("ledger.key"),
        )
        .expect("ledger key");
        let signer = || {
            NoteSigner::new(
                "troop.local/ledger",
                ed25519_dalek::SigningKey::from_bytes(&log_key),
            )
            .expect("signer")
        };
        let mut report = None;
        wait_for(
            "troop-audit to see every hold closed in a checkpoint",
            || {
                let source = troop_audit::Source::open(&format!("{via}/ledger")).expect("source");
                let r = troop_audit::verify(&source, &signer().verifier(), Some(since), &|_| {})
                    .expect("troop-audit accepts the cluster's ledger");
                let done = r.ledger.open_holds().count() == 0;
                report = Some(r);
                done
            },
        );
        let report = report.expect("verified");
        assert!(
            report.since_size.is_some(),
            "the earlier checkpoint is a prefix"
        );
        assert_eq!(
            report.ledger.account(consumer).expect("consumer").balance(),
            i128::from(balance)
        );

        // Kafka alone rebuilds the same projections.
        let (target, _) = self.runtime.block_on(common::cluster::migrated_database());
        self.runtime
            .block_on(replay::replay(&self.cluster, &target.url, signer()))
            .expect("replays");
        let (_, _, differences) = self
            .runtime
            .block_on(replay::compare(
                &self.db.url,
                &target.url,
                &signer().verifier(),
            ))
            .expect("compares");
        assert!(differences.is_empty(), "{differences:?}");
    }
}

/// One test at a time: each runs three node processes (and one a model
/// server) on a two-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn kill_9_a_node_with_requests_in_flight_loses_nothing_else() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let mut nodes = ThreeNodes::start("faults");
    let (account, key) = consumer(&nodes.url(0), ADMIN, GRANT);
    let consumer_id: AccountId = account.parse().expect("id");
    let (victim, (reader, other)) = nodes.victim(&[Home::Account(consumer_id)]);
    let (reader_url, other_url, victim_url) =
        (nodes.url(reader), nodes.url(other), nodes.url(victim));

    // One request settled before the fault: through the reader, served by a
    // worker on the other survivor.
    let worker = common::scripted::spawn(other_url.clone(), Script::Inflate);
    wait_for("the reader to offer the other node's worker", || {
        get(&reader_url, &key, "/v1/models")
            .is_ok_and(|m| m["data"].as_array().is_some_and(|d| !d.is_empty()))
    });
    let done: Value = ureq::post(&format!("{reader_url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"))
        .send_json(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}))
        .expect("served before the fault")
        .into_json()
        .expect("json");
    assert_eq!(done["usage"]["completion_tokens"], 3, "{done}");
    worker.join().expect("worker");
    let mut settled = 0;
    wait_for("the settlement", || {
        get(&reader_url, &key, "/v1/account").is_ok_and(|v| {
            settled = balance(&v);
            v["holds"].as_array().is_some_and(Vec::is_empty) && settled < GRANT
        })
    });
    let charged = GRANT - settled;

    // Requests in flight on the victim, served by a worker of its own (another
    // identity, which stalls after the first token).
    common::scripted::spawn_as(victim_url.clone(), Script::Stall, 7);
    wait_for("the victim's own worker", || {
        common::harness::admin_get(&victim_url, ADMIN, "/admin/workers")["workers"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    });
    common::scripted::streams_in_flight(&victim_url, &key, IN_FLIGHT);
    wait_for("the in-flight requests' holds, read on the reader", || {
        get(&reader_url, &key, "/v1/account")
            .is_ok_and(|v| v["holds"].as_array().is_some_and(|h| h.len() == IN_FLIGHT))
    });

    let since = checkpoint(&other_url);
    nodes.kill(victim);

    // The victim stops advertising itself; ten seconds later the account's
    // owner voids the holds it placed.
    let mut after = Value::Null;
    wait_for_up_to(
        "the dead node's holds voided",
        Duration::from_secs(60),
        || {
            get(&reader_url, &key, "/v1/account").is_ok_and(|v| {
                after = v;
                after["holds"].as_array().is_some_and(Vec::is_empty)
            })
        },
    );
    assert_eq!(balance(&after), GRANT - charged, "nothing else moved");
    assert_eq!(after["available_micro"], after["balance_micro"]);
    let events = nodes
        .runtime
        .block_on(common::cluster::ledger_events(&nodes.client));
    assert_eq!(
        common::cluster::dead_node_voids(&events),
        IN_FLIGHT,
        "each dead request's hold voided once"
    );

    nodes.audit_and_replay(&other_url, &since, &consumer_id, GRANT - charged);
}

/// The cluster's checkpoint now, as `url` serves it.
fn checkpoint(url: &str) -> String {
    ureq::get(&format!("{url}/ledger/checkpoint"))
        .call()
        .expect("checkpoint")
        .into_string()
        .expect("text")
}

/// Asks `url` for a chat completion of the real model; returns its text and
/// completion tokens.
fn chat(url: &str, key: &str, stream: bool) -> (String, u64) {
    let body = json!({
        "model": REAL_MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "stream": stream,
        "stream_options": {"include_usage": true},
    });
    // A 503 is retried after its Retry-After, as the OpenAI SDKs do: for a
    // second or two after a node dies its stale offers are still tried first.
    let mut refusals = 0;
    let response = loop {
        match ureq::post(&format!("{url}/v1/chat/completions"))
            .set("authorization", &format!("Bearer {key}"))
            .send_json(body.clone())
        {
            Ok(r) => break r,
            Err(ureq::Error::Status(503, r)) if refusals < 10 => {
                refusals += 1;
                let wait_s: u64 = r
                    .header("retry-after")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1);
                eprintln!(
                    "503 ({}), retried in {wait_s} s",
                    r.into_string().unwrap_or_default()
                );
                std::thread::sleep(Duration::from_secs(wait_s));
            }
            Err(ureq::Error::Status(code, r)) => {
                panic!("{code}: {}", r.into_string().unwrap_or_default())
            }
            Err(e) => panic!("{e}"),
        }
    };
    if !stream {
        let v: Value = response.into_json().expect("json");
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("text")
            .to_owned();
        return (
            text,
            v["usage"]["completion_tokens"].as_u64().expect("usage"),
        );
    }
    let body = response.into_string().expect("event stream");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let mut text = String::new();
    let mut tokens = None;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n);
        }
    }
    (text, tokens.expect("a usage chunk"))
}

/// Whether node `url` has the worker `worker` connected.
fn holds_worker(url: &str, worker: &str) -> bool {
    common::harness::admin_get(url, ADMIN, "/admin/workers")["workers"]
        .as_array()
        .is_some_and(|w| w.iter().any(|w| w["worker"] == worker))
}

#[test]
fn a_real_agent_whose_node_dies_serves_on_from_another_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let model = model_server::ModelServer::start();
    let mut nodes = ThreeNodes::start("agent-moves");
    let (account, key) = consumer(&nodes.url(0), ADMIN, GRANT);
    let keys = tempfile::tempdir().expect("dir");
    let (identity, _) =
        troop_agent::identity::load_or_create(&keys.path().join("worker.key")).expect("identity");
    let worker = identity.worker_id();

    let consumer_id: AccountId = account.parse().expect("id");
    let (victim, (refuge, front)) =
        nodes.victim(&[Home::Account(consumer_id), Home::Worker(worker)]);
    let (victim_url, refuge_url, front_url) =
        (nodes.url(victim), nodes.url(refuge), nodes.url(front));

    // The agent knows the victim first, then the refuge.
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let agent = {
        let (coordinators, engine_url) =
            (vec![victim_url.clone(), refuge_url.clone()], model.url());
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(async move {
                    let engine =
                        troop_agent::engine::probe(&troop_agent::engine::client(), &engine_url)
                            .await
                            .expect("engine");
                    let agent = troop_agent::link::Agent::new(coordinators, engine, identity, 2);
                    troop_agent::link::run(agent, stop_rx).await;
                });
        })
    };
    let worker = worker.to_string();
    wait_for("the agent on the victim", || {
        holds_worker(&victim_url, &worker)
    });
    wait_for("the front node to offer the real model", || {
        get(&front_url, &key, "/v1/models").is_ok_and(|m| {
            m["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|m| m["id"] == REAL_MODEL))
        })
    });
    let (text, before) = chat(&front_url, &key, false);
    assert!(
        !text.is_empty() && before > 0,
        "relayed to the victim's worker"
    );
    wait_for("the first settlement", || {
        get(&front_url, &key, "/v1/account")
            .is_ok_and(|v| v["holds"].as_array().is_some_and(Vec::is_empty) && balance(&v) < GRANT)
    });
    let since = checkpoint(&front_url);

    nodes.kill(victim);
    let killed = Instant::now();
    wait_for("the agent on the refuge", || {
        holds_worker(&refuge_url, &worker)
    });
    eprintln!(
        "the agent was back on another node {} ms after its node died",
        killed.elapsed().as_millis()
    );
    let (text, after) = chat(&front_url, &key, true);
    assert!(
        !text.is_empty() && after > 0,
        "relayed to the refuge's worker"
    );

    let mut charged = 0;
    wait_for("both settlements in the receipts", || {
        let rows = nodes
            .runtime
            .block_on(nodes.client.query(
                "select charged_micro from receipts where consumer = $1 and worker = $2",
                &[&account, &worker],
            ))
            .expect("receipts");
        charged = rows.iter().map(|r| r.get::<_, i64>(0)).sum();
        rows.len() == 2
    });
    let charged = u64::try_from(charged).expect("≥ 0");
    wait_for("the balance", || {
        get(&front_url, &key, "/v1/account").is_ok_and(|v| balance(&v) == GRANT - charged)
    });
    nodes.audit_and_replay(&front_url, &since, &consumer_id, GRANT - charged);
    stop.send_replace(true);
    agent.join().expect("the agent drains and stops");
}
