//! Faults on a three-node cluster of `troop-coordinator node` processes on
//! noida-db and Postgres. `kill -9` a node with requests in flight: the
//! requests it held die with it, the holds they placed are voided by their
//! account's owner once the node stops advertising itself, nothing settled
//! before is lost, nothing is charged twice, `troop-audit verify` accepts
//! the cluster's `/ledger/` since a checkpoint taken before the fault, and a
//! replay of Kafka reproduces the live projections. And a real `troop-agent`
//! in front of a real llama.cpp server, whose node is killed, is back on
//! another node within seconds, serving requests relayed from the third.
//! And every node stopped, Kafka replayed into a fresh database and the
//! nodes started on it: the network carries on from exactly where it was.
//! And Postgres (a server of the test's own) stopped for ten seconds, as a
//! crash would, under load from every node, and the broker frozen for three
//! seconds: every refusal says when to retry, every request served is
//! receipted once, nothing else is charged.

mod common;
#[path = "../../worker-agent/tests/common/model_server.rs"]
mod model_server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
    common::harness::wait_until_ready(&node.1);
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

/// One row of the `receipts` projection.
struct ReceiptRow {
    job: String,
    worker: String,
    charged_micro: i64,
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
    broker: common::services::Broker,
    runtime: tokio::runtime::Runtime,
}

impl ThreeNodes {
    fn start(prefix: &str) -> Self {
        Self::start_on(prefix, common::services::Database::create())
    }

    /// [`Self::start`] with the projections in `db`.
    fn start_on(prefix: &str, db: common::services::Database) -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let (db, broker, cluster, client) =
            runtime.block_on(common::cluster::cluster_on(db, prefix, PARTITIONS));
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
            broker,
            runtime,
        }
    }

    /// A new client on the database (the old one died with its server).
    fn reconnect(&mut self) {
        self.client = self
            .runtime
            .block_on(troop_coordinator::cluster::migrate::connect_postgres(
                &self.cluster,
            ))
            .expect("postgres");
    }

    /// The receipts charging `consumer`, as projected in Postgres.
    fn receipts(&self, consumer: &str) -> Vec<ReceiptRow> {
        self.runtime
            .block_on(self.client.query(
                "select job, worker, charged_micro from receipts where consumer = $1",
                &[&consumer],
            ))
            .expect("receipts")
            .iter()
            .map(|r| ReceiptRow {
                job: r.get(0),
                worker: r.get(1),
                charged_micro: r.get(2),
            })
            .collect()
    }

    fn url(&self, i: usize) -> String {
        self.nodes[i].as_ref().expect("alive").1.clone()
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    /// SIGTERM, as `systemctl stop` sends: the node leaves the owners' group
    /// and withdraws its presence before it exits.
    fn stop(&mut self, i: usize) {
        let mut node = self.nodes[i].take().expect("alive");
        let pid = node.0.id().to_string();
        let sent = std::process::Command::new("kill")
            .arg(&pid)
            .status()
            .expect("kill");
        assert!(sent.success(), "SIGTERM to node {i}");
        let exited = node.0.wait().expect("the node exits");
        assert!(exited.success(), "node {i} stopped cleanly: {exited}");
    }

    /// The runbook's "Rebuild projections" to the end: every node stopped,
    /// Kafka replayed into a fresh database, that database checked equal to
    /// the live one, and every node started again on it.
    fn switch_to_replayed_database(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
        let (target, client) = self.replayed();
        self.cluster.postgres = target.url.clone();
        self.client = client;
        self.db = target;
        for (i, (name, dir)) in self.names.iter().zip(&self.dirs).enumerate() {
            self.nodes[i] = Some(start(name, dir.path(), &self.cluster));
        }
    }

    /// Kafka replayed into a fresh database, checked equal to the live one.
    fn replayed(&self) -> (common::services::Database, tokio_postgres::Client) {
        let (target, client) = self.runtime.block_on(common::cluster::migrated_database());
        let signer = self.signer();
        self.runtime
            .block_on(replay::replay(&self.cluster, &target.url, signer.clone()))
            .expect("replays");
        let (_, _, differences) = self
            .runtime
            .block_on(replay::compare(
                &self.db.url,
                &target.url,
                &signer.verifier(),
            ))
            .expect("compares");
        assert!(differences.is_empty(), "{differences:?}");
        (target, client)
    }

    /// The ledger's signer, from the network's key.
    fn signer(&self) -> NoteSigner {
        let log_key = troop_coordinator::cluster::node::shared_secret(
            &self.dirs[0].path().join("ledger.key"),
        )
        .expect("ledger key");
        NoteSigner::new(
            "troop.local/ledger",
            ed25519_dalek::SigningKey::from_bytes(&log_key),
        )
        .expect("signer")
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
        let verifier = self.signer().verifier();
        let mut report = None;
        wait_for(
            "troop-audit to see every hold closed in a checkpoint",
            || {
                let source = troop_audit::Source::open(&format!("{via}/ledger")).expect("source");
                let r = troop_audit::verify(&source, &verifier, Some(since), &|_| {})
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
        self.replayed();
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

/// A chat completion through `via` served by a scripted worker (the same
/// identity each time) on `serving`, relayed when they differ; returns the
/// receipt's id once the hold is settled and the balance `via` reads then.
fn relayed_chat(via: &str, serving: &str, key: &str) -> (String, u64) {
    let worker = common::scripted::spawn(serving.to_owned(), Script::Inflate);
    wait_for("the worker offered through the consumer's node", || {
        get(via, key, "/v1/models")
            .is_ok_and(|m| m["data"].as_array().is_some_and(|d| !d.is_empty()))
    });
    let before = balance(&get(via, key, "/v1/account").expect("account"));
    let job = common::nodes::inflated_chat(via, key, "a relayed chat completion");
    worker.join().expect("worker");
    let mut settled = 0;
    wait_for("the settlement", || {
        get(via, key, "/v1/account").is_ok_and(|v| {
            settled = balance(&v);
            v["holds"].as_array().is_some_and(Vec::is_empty) && settled < before
        })
    });
    (job, settled)
}

#[test]
fn a_cluster_switched_to_its_replayed_database_carries_on() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let mut nodes = ThreeNodes::start("rebuild");
    let (account, key) = consumer(&nodes.url(0), ADMIN, GRANT);
    let consumer_id: AccountId = account.parse().expect("id");
    let (before, settled) = relayed_chat(&nodes.url(0), &nodes.url(1), &key);
    let since = checkpoint(&nodes.url(2));

    nodes.switch_to_replayed_database();

    // The rebuilt database holds the key (the directory is replayed), the
    // balance, and the receipt with a proof from its tiles.
    let via = nodes.url(2);
    wait_for(
        "the rebuilt cluster to know the key and the balance",
        || get(&via, &key, "/v1/account").is_ok_and(|v| balance(&v) == settled),
    );
    let receipt = get(&via, &key, &format!("/v1/receipts/{before}")).expect("the receipt");
    assert!(
        receipt["tlog_proof"]
            .as_str()
            .is_some_and(|p| p.starts_with("c2sp.org/tlog-proof@v1")),
        "{receipt}"
    );
    // It carries on: the worker registered before the switch serves again,
    // relayed, and is paid; the sequencer extends the replayed tree.
    let (after, now) = relayed_chat(&via, &nodes.url(0), &key);
    assert_ne!(after, before);
    let charged = GRANT - settled;
    assert_eq!(now, settled - charged, "the same request costs the same");
    nodes.audit_and_replay(&via, &since, &consumer_id, now);
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
    // second or two after a node dies its stale offers are still tried first,
    // and a node just started has not read the prices yet.
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

/// A real `troop-agent` with two slots in front of the engine at
/// `engine_url`, trying `coordinators` in order, on a thread of its own;
/// it drains and stops once the returned sender says `true`.
fn spawn_agent(
    coordinators: Vec<String>,
    engine_url: String,
    identity: troop_agent::identity::Identity,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let agent = std::thread::spawn(move || {
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
    });
    (stop, agent)
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
    let (stop, agent) = spawn_agent(
        vec![victim_url.clone(), refuge_url.clone()],
        model.url(),
        identity,
    );
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
        let rows = nodes.receipts(&account);
        let by_worker: Vec<_> = rows.iter().filter(|r| r.worker == worker).collect();
        charged = by_worker.iter().map(|r| r.charged_micro).sum();
        by_worker.len() == 2
    });
    let charged = u64::try_from(charged).expect("≥ 0");
    wait_for("the balance", || {
        get(&front_url, &key, "/v1/account").is_ok_and(|v| balance(&v) == GRANT - charged)
    });
    nodes.audit_and_replay(&front_url, &since, &consumer_id, GRANT - charged);
    stop.send_replace(true);
    agent.join().expect("the agent drains and stops");
}

/// What one request of [`load`] came to, and in which phase of a fault test
/// it was sent (0 before the fault, 1 during it, 2 after) to which node.
#[derive(Debug)]
enum Outcome {
    Served {
        job: String,
        phase: u8,
        node: usize,
    },
    Refused {
        status: u16,
        code: String,
        retry_after: bool,
        phase: u8,
        node: usize,
    },
}

/// Asks `url` (node `node`) for chat completions of the real model one after
/// another until `stop`; counts in `relayed_after` those served that were
/// sent after the fault to a node other than the agent's (node 0).
fn load(
    node: usize,
    url: String,
    key: String,
    phase: Arc<AtomicU8>,
    relayed_after: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Outcome>> {
    std::thread::spawn(move || {
        // A request that hangs is a failure too.
        let http = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let body = json!({"model": REAL_MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8});
        let mut outcomes = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let at = phase.load(Ordering::SeqCst);
            match http
                .post(&format!("{url}/v1/chat/completions"))
                .set("authorization", &format!("Bearer {key}"))
                .send_json(body.clone())
            {
                Ok(r) => {
                    let job = r.header("troop-receipt").expect("names its receipt");
                    let job = job.to_owned();
                    let v: Value = r.into_json().expect("json");
                    assert!(v["usage"]["completion_tokens"].as_u64() > Some(0), "{v}");
                    if at == 2 && node != 0 {
                        relayed_after.fetch_add(1, Ordering::SeqCst);
                    }
                    outcomes.push(Outcome::Served {
                        job,
                        phase: at,
                        node,
                    });
                }
                Err(ureq::Error::Status(status, r)) => {
                    let retry_after = r.header("retry-after").is_some();
                    let v: Value = r.into_json().unwrap_or_default();
                    if status != 503 {
                        eprintln!("node {node}, phase {at}: {status} {v}");
                    }
                    outcomes.push(Outcome::Refused {
                        status,
                        code: v["error"]["code"].as_str().unwrap_or_default().to_owned(),
                        retry_after,
                        phase: at,
                        node,
                    });
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{url}: {e}"),
            }
        }
        outcomes
    })
}

/// The real agent on node 0 and consumers on every node (two of them relayed
/// to the agent's node) asking for completions before `fault` (phase 0),
/// while it runs (1) and after it returns (2), until requests are relayed
/// again. Returns every outcome and a checkpoint taken before the fault.
fn outcomes_around(
    nodes: &mut ThreeNodes,
    key: &str,
    model_url: String,
    fault: impl FnOnce(&mut ThreeNodes),
) -> (Vec<Outcome>, String) {
    let urls: Vec<String> = (0..3).map(|i| nodes.url(i)).collect();
    let keys = tempfile::tempdir().expect("dir");
    let (identity, _) =
        troop_agent::identity::load_or_create(&keys.path().join("worker.key")).expect("identity");
    let (stop_agent, agent) = spawn_agent(urls.clone(), model_url, identity);
    for url in &urls {
        wait_for("every node to offer the real model", || {
            get(url, key, "/v1/models").is_ok_and(|m| {
                m["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|m| m["id"] == REAL_MODEL))
            })
        });
    }

    let phase = Arc::new(AtomicU8::new(0));
    let relayed_after = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(node, url)| {
            load(
                node,
                url.clone(),
                key.to_owned(),
                Arc::clone(&phase),
                Arc::clone(&relayed_after),
                Arc::clone(&stop),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let since = checkpoint(&urls[0]);

    phase.store(1, Ordering::SeqCst);
    fault(nodes);
    phase.store(2, Ordering::SeqCst);
    let recovered = Instant::now();
    // Relaying needs the other nodes' offers, read from Postgres, and their
    // holds, written to Kafka.
    wait_for_up_to(
        "requests relayed again after the fault",
        Duration::from_secs(120),
        || relayed_after.load(Ordering::SeqCst) >= 2,
    );
    eprintln!(
        "relayed again {} ms after the fault ended",
        recovered.elapsed().as_millis()
    );
    stop.store(true, Ordering::SeqCst);
    let outcomes = consumers
        .into_iter()
        .flat_map(|c| c.join().expect("every request answered"))
        .collect();
    stop_agent.send_replace(true);
    agent.join().expect("the agent drains and stops");
    (outcomes, since)
}

/// Requests by (phase, node, "served" or the refusal's status and code).
type Tally = BTreeMap<(u8, usize, String), usize>;

/// Checks that every refusal in `outcomes` was one a client can act on (a
/// 503 saying when to retry) and that each request served names its own
/// receipt; returns the jobs served and a tally by (phase, node, outcome).
fn served_and_tally(outcomes: &[Outcome]) -> (BTreeSet<String>, Tally) {
    let mut served: BTreeSet<String> = BTreeSet::new();
    let mut tally = Tally::new();
    for o in outcomes {
        match o {
            Outcome::Served { job, phase, node } => {
                assert!(served.insert(job.clone()), "one receipt per request");
                *tally.entry((*phase, *node, "served".into())).or_default() += 1;
            }
            Outcome::Refused {
                status,
                code,
                retry_after,
                phase,
                node,
            } => {
                assert!(
                    *status == 503 && *retry_after,
                    "{status} {code} (phase {phase}, node {node}): a refusal says when to retry"
                );
                *tally
                    .entry((*phase, *node, format!("{status} {code}")))
                    .or_default() += 1;
            }
        }
    }
    eprintln!("outcomes by (phase, node): {tally:?}");
    assert!(
        tally.contains_key(&(0, 0, "served".into())),
        "served before the fault"
    );
    (served, tally)
}

/// Every request `served` has its receipt and no other charged the consumer
/// (`account`, with the key `key`); every hold placed closed exactly once;
/// then [`ThreeNodes::audit_and_replay`] since the checkpoint `since`.
fn nothing_lost(
    nodes: &ThreeNodes,
    served: &BTreeSet<String>,
    account: &str,
    key: &str,
    since: &str,
) {
    let consumer_id: AccountId = account.parse().expect("id");
    let url = nodes.url(0);
    wait_for_up_to("every hold closed", Duration::from_secs(60), || {
        get(&url, key, "/v1/account")
            .is_ok_and(|v| v["holds"].as_array().is_some_and(Vec::is_empty))
    });
    let mut charged = 0;
    wait_for("the receipts of every request served", || {
        let rows = nodes.receipts(account);
        let jobs: BTreeSet<String> = rows.iter().map(|r| r.job.clone()).collect();
        charged = rows.iter().map(|r| r.charged_micro).sum();
        assert!(jobs.is_subset(served), "charged for a request not served");
        jobs == *served
    });
    let charged = u64::try_from(charged).expect("≥ 0");
    let events = nodes
        .runtime
        .block_on(common::cluster::ledger_events(&nodes.client));
    let mut closed: BTreeMap<troop_schemas::HoldId, usize> = BTreeMap::new();
    let mut placed = 0;
    for e in &events {
        match e {
            troop_schemas::Event::HoldPlaced { account, .. } if *account == consumer_id => {
                placed += 1;
            }
            troop_schemas::Event::HoldSettled { hold, .. }
            | troop_schemas::Event::HoldVoided { hold, .. }
            | troop_schemas::Event::HoldExpired { hold, .. } => {
                *closed.entry(*hold).or_default() += 1;
            }
            _ => {}
        }
    }
    assert!(closed.values().all(|n| *n == 1), "a hold closed twice");
    assert_eq!(closed.len(), placed, "every hold placed closed");
    wait_for("the balance", || {
        get(&url, key, "/v1/account").is_ok_and(|v| balance(&v) == GRANT - charged)
    });
    nodes.audit_and_replay(&url, since, &consumer_id, GRANT - charged);
}

#[test]
fn stopping_postgres_for_ten_seconds_under_load_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let model = model_server::ModelServer::start();
    // A server of its own, since this test stops it.
    let postgres = common::services::PrivatePostgres::start();
    let mut nodes = ThreeNodes::start_on(
        "pg-stop",
        common::services::Database::create_on(&postgres.admin),
    );
    let (account, key) = consumer(&nodes.url(0), ADMIN, GRANT);
    let (outcomes, since) = outcomes_around(&mut nodes, &key, model.url(), |_| {
        postgres.stop();
        std::thread::sleep(Duration::from_secs(10));
        postgres.restart();
    });
    let (served, tally) = served_and_tally(&outcomes);
    // Owners judge from memory and write to Kafka: the agent's own node
    // serves on while Postgres is down.
    assert!(
        tally.contains_key(&(1, 0, "served".into())),
        "served during the stop"
    );
    nodes.reconnect();
    nothing_lost(&nodes, &served, &account, &key, &since);
}

#[test]
fn pausing_the_broker_under_load_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let model = model_server::ModelServer::start();
    let mut nodes = ThreeNodes::start("broker-pause");
    let (account, key) = consumer(&nodes.url(0), ADMIN, GRANT);
    // Shorter than the partition owners' group session: noida-db wedges a
    // group whose every member timed out (it keeps the dead leader; CLUSTER.md).
    let (outcomes, since) = outcomes_around(&mut nodes, &key, model.url(), |nodes| {
        nodes.broker.pause();
        std::thread::sleep(Duration::from_secs(3));
        nodes.broker.resume();
    });
    let (served, tally) = served_and_tally(&outcomes);
    // Requests sent while it was frozen waited for it or were refused; after
    // it, requests are served again (relayed ones too: `outcomes_around`).
    assert!(
        tally
            .keys()
            .any(|(phase, _, o)| *phase == 2 && o == "served"),
        "served after the pause"
    );
    nothing_lost(&nodes, &served, &account, &key, &since);
}
