//! Asking every live node (CLUSTER.md, "Listing the cluster's workers"): a
//! worker is connected to one node, whose registry alone knows it live (its
//! slots, its last heartbeat, its GPUs), so an operator's `/admin/workers`
//! on any node asks the others (`GET /internal/v1/workers`, the cluster's
//! secret) and answers with every node's workers, each tagged with its node,
//! and names the nodes that did not answer instead of leaving them out.

use std::sync::Arc;
use std::time::Duration;

use crate::actors::registry::WorkerView;
use crate::cluster::{Reconnecting, presence};

/// The longest one node is waited for: a listing is not worth more.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer read from one node (some 40k workers).
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// One node's answer to `GET /internal/v1/workers`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeWorkers {
    pub workers: Vec<WorkerView>,
}

/// How one node answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Asked {
    pub node: String,
    /// Its workers listed (`None` when it did not answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Why it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The cluster's workers as the live nodes answered.
#[derive(Debug, Default)]
pub struct ClusterWorkers {
    /// Every answering node's workers, each tagged with its node.
    pub workers: Vec<WorkerView>,
    /// Every live node asked, in name order, this node first.
    pub nodes: Vec<Asked>,
    /// Why the list leaves nodes out: the live nodes could not be read
    /// (then only this node's are listed), or there are too many.
    pub error: Option<String>,
}

impl ClusterWorkers {
    /// Whether every live node's workers are in the list.
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.nodes.iter().all(|n| n.error.is_none())
    }
}

/// Asks the other live nodes for their workers.
#[derive(Debug)]
pub struct Peers {
    me: String,
    pg: Arc<Reconnecting>,
    http: reqwest::Client,
    bearer: String,
}

impl Peers {
    pub fn new(me: &str, pg: Arc<Reconnecting>, secret: &str) -> Self {
        Self {
            me: me.to_owned(),
            pg,
            http: reqwest::Client::builder()
                .timeout(ASK_TIMEOUT)
                .build()
                .expect("an HTTP client with a timeout"),
            bearer: format!("Bearer {secret}"),
        }
    }

    /// `mine` (this node's workers) and every other live node's, asked at
    /// once; a node that does not answer within [`ASK_TIMEOUT`] is named.
    pub async fn workers(&self, mine: Vec<WorkerView>) -> ClusterWorkers {
        let mut out = ClusterWorkers {
            nodes: vec![Asked {
                node: self.me.clone(),
                workers: Some(mine.len()),
                error: None,
            }],
            ..ClusterWorkers::default()
        };
        out.workers.extend(mine.into_iter().map(|w| WorkerView {
            node: Some(self.me.clone()),
            ..w
        }));
        let live = match self.pg.get().await {
            Ok(client) => presence::live_nodes(&client, &self.me).await,
            Err(e) => Err(e),
        };
        let mut live = match live {
            Ok(live) => live,
            Err(e) => {
                out.error = Some(format!("reading the live nodes: {e}"));
                return out;
            }
        };
        if live.len() > presence::MAX_LIVE_NODES {
            live.truncate(presence::MAX_LIVE_NODES);
            out.error = Some(format!(
                "more than {} other live nodes: only the first asked",
                presence::MAX_LIVE_NODES
            ));
        }
        let answers = futures_util::future::join_all(
            live.iter().map(|(_, internal_url)| self.ask(internal_url)),
        )
        .await;
        for ((node, _), answer) in live.into_iter().zip(answers) {
            match answer {
                Ok(workers) => {
                    out.nodes.push(Asked {
                        node: node.clone(),
                        workers: Some(workers.len()),
                        error: None,
                    });
                    out.workers.extend(workers.into_iter().map(|w| WorkerView {
                        node: Some(node.clone()),
                        ..w
                    }));
                }
                Err(error) => out.nodes.push(Asked {
                    node,
                    workers: None,
                    error: Some(error),
                }),
            }
        }
        out
    }

    async fn ask(&self, internal_url: &str) -> Result<Vec<WorkerView>, String> {
        let mut response = self
            .http
            .get(format!("{internal_url}/internal/v1/workers"))
            .header("authorization", &self.bearer)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("it answered {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("its answer is over {MAX_ANSWER_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let answer: NodeWorkers =
            serde_json::from_slice(&body).map_err(|e| format!("its answer is garbled: {e}"))?;
        Ok(answer.workers)
    }
}
