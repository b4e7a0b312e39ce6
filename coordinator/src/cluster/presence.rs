//! Which nodes are alive (`nodes`) and which node's workers serve what
//! (`worker_presence`). Each node advertises itself every second, as an
//! incarnation (its name and a number drawn at start: a restarted node is a
//! new one, whose predecessor's requests died); each node replaces
//! its own rows about every second with what its workers offer per model,
//! and reads the other nodes' fresh rows, which its registry uses to relay a
//! request no worker of its own can take ([`crate::cluster::relay`]).
//!
//! Rows are stamped and judged fresh by the database's clock, never a
//! node's: nodes' clocks may disagree, the database's is one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::registry::{Offers, Present, Registry};
use crate::cluster::Reconnecting;
use crate::domain::placement::{Offer, Presence};

/// Rows older than this are a node that stopped publishing: not offered.
pub const STALE_AFTER: Duration = Duration::from_secs(3);

const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Replaces `node`'s rows with `present`, in one statement (a reader sees
/// the old rows or the new ones).
pub async fn publish(
    client: &tokio_postgres::Client,
    node: &str,
    present: &[Presence],
) -> Result<(), tokio_postgres::Error> {
    let models: Vec<&str> = present.iter().map(|p| p.model.as_str()).collect();
    let workers: Vec<i32> = present.iter().map(|p| int(p.workers)).collect();
    let free: Vec<i32> = present.iter().map(|p| int(p.free_slots)).collect();
    let speed: Vec<i64> = present.iter().map(|p| big(p.milli_tokens_per_s)).collect();
    let context: Vec<Option<i64>> = present.iter().map(|p| p.context_length.map(big)).collect();
    client
        .execute(
            &format!(
                "with gone as (
                   delete from worker_presence where node = $1 and not (model = any($2))
                 )
                 insert into worker_presence
                   (node, model, workers, free_slots, milli_tokens_per_s, context_length, updated_ms)
                 select $1, m, w, f, s, c, {DB_NOW_MS}
                 from unnest($2::text[], $3::int[], $4::int[], $5::bigint[], $6::bigint[]) as t(m, w, f, s, c)
                 on conflict (node, model) do update set
                   workers = excluded.workers, free_slots = excluded.free_slots,
                   milli_tokens_per_s = excluded.milli_tokens_per_s,
                   context_length = excluded.context_length, updated_ms = excluded.updated_ms"
            ),
            &[&node, &models, &workers, &free, &speed, &context],
        )
        .await?;
    Ok(())
}

/// Node incarnations are alive while they advertise themselves within this.
pub const LIVE_WITHIN: Duration = Duration::from_secs(3);

/// Says that `node` is alive as `incarnation` and answers internal calls at
/// `internal_url`, now (by the database's clock).
pub async fn advertise(
    client: &tokio_postgres::Client,
    node: &str,
    internal_url: &str,
    incarnation: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "insert into nodes (node, internal_url, incarnation, last_seen_ms)
                 values ($1, $2, $3, {DB_NOW_MS})
                 on conflict (node) do update set internal_url = excluded.internal_url,
                   incarnation = excluded.incarnation, last_seen_ms = excluded.last_seen_ms"
            ),
            &[&node, &internal_url, &incarnation],
        )
        .await?;
    Ok(())
}

/// The incarnations of the nodes that advertised within [`LIVE_WITHIN`].
pub async fn live_incarnations(
    client: &tokio_postgres::Client,
) -> Result<HashSet<String>, tokio_postgres::Error> {
    let within_ms = i64::try_from(LIVE_WITHIN.as_millis()).unwrap_or(i64::MAX);
    let rows = client
        .query(
            &format!("select incarnation from nodes where last_seen_ms > {DB_NOW_MS} - $1"),
            &[&within_ms],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The most nodes one admin call fans out to: far above any cluster's size.
pub const MAX_LIVE_NODES: usize = 256;

/// The nodes other than `me` that advertised within [`LIVE_WITHIN`], by
/// name, with where each answers internal calls: at most one more than
/// [`MAX_LIVE_NODES`], so that a caller can tell there were too many.
pub async fn live_nodes(
    client: &tokio_postgres::Client,
    me: &str,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let within_ms = i64::try_from(LIVE_WITHIN.as_millis()).unwrap_or(i64::MAX);
    let limit = i64::try_from(MAX_LIVE_NODES + 1).unwrap_or(i64::MAX);
    let rows = client
        .query(
            &format!(
                "select node, internal_url from nodes
                 where node <> $1 and last_seen_ms > {DB_NOW_MS} - $2
                 order by node limit $3"
            ),
            &[&me, &within_ms, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Removes `node`'s rows (it is leaving).
pub async fn withdraw(
    client: &tokio_postgres::Client,
    node: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("delete from worker_presence where node = $1", &[&node])
        .await?;
    Ok(())
}

/// What the nodes other than `me` offer, published within [`STALE_AFTER`],
/// with where each answers internal calls.
pub async fn offers(
    client: &tokio_postgres::Client,
    me: &str,
) -> Result<Vec<Offer>, tokio_postgres::Error> {
    let stale_ms = i64::try_from(STALE_AFTER.as_millis()).unwrap_or(i64::MAX);
    let rows = client
        .query(
            &format!(
                "select p.node, n.internal_url, p.model, p.workers, p.free_slots,
                        p.milli_tokens_per_s, p.context_length
                 from worker_presence p join nodes n on n.node = p.node
                 where p.node <> $1 and p.updated_ms > {DB_NOW_MS} - $2
                 order by p.node, p.model"
            ),
            &[&me, &stale_ms],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Offer {
            node: r.get(0),
            internal_url: r.get(1),
            presence: Presence {
                model: r.get(2),
                workers: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                free_slots: u32::try_from(r.get::<_, i32>(4)).unwrap_or(0),
                milli_tokens_per_s: u64::try_from(r.get::<_, i64>(5)).unwrap_or(0),
                context_length: r
                    .get::<_, Option<i64>>(6)
                    .and_then(|c| u64::try_from(c).ok()),
            },
        })
        .collect())
}

/// Every `every`: publishes what this node's workers offer and hands the
/// registry what the others offer. When Postgres cannot be reached, the
/// registry uses what it last read until that is too old, then offers nothing
/// remote; this node's own workers still serve.
pub async fn follow(pg: Arc<Reconnecting>, me: String, registry: Addr<Registry>, every: Duration) {
    loop {
        let looked = async {
            let present = registry
                .send(Present {
                    now_ms: crate::server::now_ms(),
                })
                .await
                .unwrap_or_default();
            let client = pg.get().await?;
            publish(&client, &me, &present).await?;
            offers(&client, &me).await
        }
        .await;
        match looked {
            Ok(offers) => registry.do_send(Offers {
                offers,
                read_ms: crate::server::now_ms(),
            }),
            // The registry stops using what it last read once that is too old.
            Err(e) => tracing::warn!(error = %e, "publishing or reading worker presence failed"),
        }
        tokio::time::sleep(every).await;
    }
}
