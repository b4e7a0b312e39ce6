//! Two cluster nodes (`troop-coordinator node`, in-process) on noida-db and
//! Postgres, serving the same API as the embedded coordinator: an account
//! opened, granted and keyed through one node is known to the other; a
//! worker on node A serves a chat completion paid from that account, whose
//! judge may be either node; the receipt and the balance read back from node
//! B (Postgres) with a proof troop-audit's checks accept; a key revoked and a
//! worker banned through node B take effect on node A; the job shows in the
//! worker's history (its topic, projected into Postgres). Each node's
//! `/metrics` shows one sequencer leading and every partition owned, and
//! exports every series the ops alert rules and dashboard name.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::harness::{admin, wait_for};
use common::nodes::{ADMIN, get, inflated_chat, shared_keys, start_node};
use common::scripted::Script;
use serde_json::{Value, json};
use troop_coordinator::cluster::{node, replay};

const GRANT: u64 = 1_000_000;

/// A node's `/metrics`, by series name (labels dropped, values summed).
fn scrape(url: &str) -> BTreeMap<String, f64> {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        *out.entry(name.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// The `troop_*` metric names in an ops file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("troop_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // A whole name (not `troop_*` in a comment, nor inside a longer word).
        let before = rest[..at].chars().last();
        if end > "troop_".len() && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn two_nodes_serve_one_network_through_kafka_and_postgres() {
    // The nodes' warnings, shown with a failure.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (db, _broker, cluster, client) = runtime.block_on(common::cluster::cluster("node", 4));
    let dirs = shared_keys(2);
    let a = start_node("node-a", dirs[0].path(), &cluster);
    let b = start_node("node-b", dirs[1].path(), &cluster);

    // An account opened and granted through node A, its key issued through
    // node A too (it waits for the account to be read there).
    let account = admin(&a, ADMIN, "/admin/accounts", json!({}))["account"]
        .as_str()
        .expect("account")
        .to_owned();
    admin(
        &a,
        ADMIN,
        "/admin/grants",
        json!({"account": account, "amount_micro": GRANT}),
    );
    let key = admin(&a, ADMIN, "/admin/keys", json!({"account": account}))["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    // Node B learns the key from the directory and reads the grant.
    wait_for("node B to know the key and the grant", || {
        get(&b, &key, "/v1/account")
            .is_ok_and(|v| v["balance_micro"].as_str() == Some(&GRANT.to_string()))
    });

    // A worker on node A; the prices reached both nodes through the ledger.
    let worker = common::scripted::spawn(a.clone(), Script::Inflate);
    common::harness::wait_for_models(&a);
    let models = get(&b, &key, "/v1/models").expect("models");
    assert!(models["data"].as_array().is_some(), "{models}");
    // Paid for the three tokens streamed, not the thousand claimed.
    let job = inflated_chat(&a, &key, "a chat completion through node A");
    worker.join().expect("worker");

    // The receipt, read from Postgres through node B, once in a checkpoint.
    let mut receipt = Value::Null;
    wait_for("the receipt on node B", || {
        get(&b, &key, &format!("/v1/receipts/{job}")).is_ok_and(|r| {
            receipt = r;
            true
        })
    });
    let charged = receipt["charged_micro"].as_u64().expect("charged");
    assert!(charged > 0, "{receipt}");
    assert!(
        receipt["tlog_proof"]
            .as_str()
            .is_some_and(|p| p.starts_with("c2sp.org/tlog-proof@v1")),
        "{receipt}"
    );
    let row = runtime
        .block_on(client.query_one(
            "select consumer, charged_micro from receipts where job = $1",
            &[&job],
        ))
        .expect("the receipt's row");
    assert_eq!(row.get::<_, String>(0), account);
    assert_eq!(row.get::<_, i64>(1), i64::try_from(charged).expect("fits"));
    wait_for("the settlement on node B", || {
        get(&b, &key, "/v1/account").is_ok_and(|v| {
            v["holds"].as_array().is_some_and(Vec::is_empty)
                && v["balance_micro"].as_str() == Some(&(GRANT - charged).to_string())
        })
    });
    // The job is in the worker's history: produced to troop.jobs by node A,
    // projected into Postgres by whichever node holds the projector's lock,
    // where every node reads it (the worker has gone, so no worker list
    // shows it now).
    wait_for("the job in the worker's history", || {
        let started = runtime.block_on(client.query_one(
            "select coalesce(sum(jobs_started), 0)::int8, count(*) from worker_history",
            &[],
        ));
        started.is_ok_and(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)) == (1, 1))
    });
    // The checkpoint both nodes serve is the one signed with the network's key.
    let checkpoint = |url: &str| {
        ureq::get(&format!("{url}/ledger/checkpoint"))
            .call()
            .expect("checkpoint")
            .into_string()
            .expect("text")
    };
    wait_for("the same checkpoint on both nodes", || {
        checkpoint(&a) == checkpoint(&b)
    });

    // What the operators' alerts and dashboard watch: one node leads the
    // sequencer and one the history projector, every partition has one
    // owner, both see the ledger grow.
    wait_for("one leader and an owner for each partition", || {
        let (ma, mb) = (scrape(&a), scrape(&b));
        let sum = |name: &str| {
            ma.get(name).copied().unwrap_or(0.0) + mb.get(name).copied().unwrap_or(0.0)
        };
        sum("troop_sequencer_leading") == 1.0
            && sum("troop_history_projector_leading") == 1.0
            && sum("troop_partitions_owned") == 4.0
            && ma.get("troop_ledger_partitions") == Some(&4.0)
            && ma.get("troop_ledger_entries").is_some_and(|n| *n > 0.0)
            && mb.get("troop_ledger_entries").is_some_and(|n| *n > 0.0)
    });
    // Every troop_* series the alert rules and the dashboard name is one a
    // node exports (histograms by their _bucket series).
    let exported = scrape(&a);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "ops/prometheus/alerts.yml",
        "ops/grafana/dashboards/troop.json",
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect("ops file");
        let named = metric_names(&text);
        assert!(named.len() > 5, "{file} names {named:?}");
        for name in named {
            assert!(
                exported.contains_key(&name),
                "{file} names {name}, which a node does not export"
            );
        }
    }

    // Revoked through node B: node A refuses the key soon after.
    let key_id = key
        .strip_prefix("troop-sk-")
        .and_then(|r| r.split_once('-'))
        .map(|(id, _)| format!("key_{id}"))
        .expect("key id");
    admin(&b, ADMIN, "/admin/keys/revoke", json!({"key": key_id}));
    wait_for("node A to refuse the revoked key", || {
        get(&a, &key, "/v1/account") == Err(401)
    });

    // Banned through node B: node A refuses the worker's next connection
    // (the scripted worker panics when its connection is closed on it).
    let worker_key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let worker_id = troop_schemas::WorkerId::from_key(&troop_schemas::PublicKey(
        worker_key.verifying_key().to_bytes(),
    ));
    admin(
        &b,
        ADMIN,
        "/admin/workers/ban",
        json!({"worker": worker_id.to_string()}),
    );
    wait_for("the ban in Postgres", || {
        runtime
            .block_on(client.query_opt(
                "select 1 from bans where worker = $1",
                &[&worker_id.to_string()],
            ))
            .expect("query")
            .is_some()
    });
    // Node A looks at the directory every second.
    std::thread::sleep(node::REFRESH_EVERY * 3);
    let (refused_tx, refused) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = refused_tx.send(common::scripted::spawn(a, Script::Inflate).join().is_err());
    });
    assert_eq!(
        refused.recv_timeout(Duration::from_secs(30)),
        Ok(true),
        "node A let the worker banned through node B connect"
    );

    // Kafka alone rebuilds every projection, the directory included: the
    // key issued and revoked, the ban.
    let log_key = node::shared_secret(&dirs[0].path().join("ledger.key")).expect("ledger key");
    let signer = troop_ledger::note::NoteSigner::new(
        "troop.local/ledger",
        ed25519_dalek::SigningKey::from_bytes(&log_key),
    )
    .expect("signer");
    let (target, target_client) = runtime.block_on(common::cluster::migrated_database());
    let replayed = runtime
        .block_on(replay::replay(&cluster, &target.url, signer.clone()))
        .expect("replays");
    assert_eq!(replayed.directory, 3, "issued, revoked, banned");
    let revoked: bool = runtime
        .block_on(
            target_client.query_one("select revoked from api_keys where key_id = $1", &[&key_id]),
        )
        .expect("the replayed key")
        .get(0);
    assert!(revoked, "the revocation is replayed");
    assert!(
        runtime
            .block_on(target_client.query_opt(
                "select 1 from bans where worker = $1",
                &[&worker_id.to_string()],
            ))
            .expect("query")
            .is_some(),
        "the ban is replayed"
    );
    let (_, _, differences) = runtime
        .block_on(replay::compare(&db.url, &target.url, &signer.verifier()))
        .expect("compares");
    assert!(differences.is_empty(), "{differences:?}");
}
