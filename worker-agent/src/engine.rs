//! Finding and describing the local inference engine.
//!
//! Without `--engine URL`, the agent tries each engine's default port on
//! localhost in priority order — vLLM (8000), Ollama (11434), LM Studio (1234),
//! llama.cpp server (8080) — and attaches to the first that answers the OpenAI
//! `/v1/models` call.

use std::time::Duration;

use serde_json::Value;
use troop_schemas::protocol::{EngineKind, ModelInfo};

pub const DEFAULT_ENGINES: [(EngineKind, u16); 4] = [
    (EngineKind::Vllm, 8000),
    (EngineKind::Ollama, 11434),
    (EngineKind::LmStudio, 1234),
    (EngineKind::LlamaCpp, 8080),
];

/// Concurrency when the engine does not say (vLLM batches continuously; this is
/// what one agent offers the network, not an engine limit).
pub const DEFAULT_SLOTS: u32 = 4;
/// Responses of the discovery calls are small; a larger one is not an engine.
const MAX_DISCOVERY_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no engine answered at {0}")]
    Unreachable(String),
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {why}")]
    Malformed { url: String, why: String },
    #[error("no inference engine found on the default ports ({0}); start one or pass --engine URL")]
    NoneFound(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Engine {
    pub kind: EngineKind,
    pub base_url: String,
    pub models: Vec<ModelInfo>,
    pub slots: u32,
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client with static settings builds")
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, EngineError> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|_| EngineError::Unreachable(url.to_owned()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(EngineError::Status {
            url: url.to_owned(),
            status,
        });
    }
    let bytes = resp.bytes().await.map_err(|e| EngineError::Malformed {
        url: url.to_owned(),
        why: e.to_string(),
    })?;
    if bytes.len() > MAX_DISCOVERY_BYTES {
        return Err(EngineError::Malformed {
            url: url.to_owned(),
            why: "response too large".into(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| EngineError::Malformed {
        url: url.to_owned(),
        why: e.to_string(),
    })
}

/// Which engine served this `/v1/models` answer, from its `owned_by` fields.
pub fn classify(models: &Value, has_ollama_tags: bool) -> EngineKind {
    let owners: Vec<&str> = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["owned_by"].as_str())
        .collect();
    if owners.contains(&"vllm") {
        EngineKind::Vllm
    } else if owners.contains(&"llamacpp") {
        EngineKind::LlamaCpp
    } else if has_ollama_tags {
        EngineKind::Ollama
    } else {
        EngineKind::OpenAiCompatible
    }
}

/// Models from an OpenAI `/v1/models` answer, with context length where the
/// engine reports it (vLLM: `max_model_len`; llama.cpp: `meta.n_ctx`, per slot).
pub fn parse_models(models: &Value) -> Vec<ModelInfo> {
    models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let name = m["id"].as_str()?;
            if name.is_empty() || name.len() > troop_schemas::protocol::MAX_TEXT_BYTES {
                return None;
            }
            let context_length = m["max_model_len"]
                .as_u64()
                .or_else(|| m["meta"]["n_ctx"].as_u64());
            Some(ModelInfo {
                name: name.to_owned(),
                context_length,
            })
        })
        .take(troop_schemas::protocol::MAX_MODELS)
        .collect()
}

/// Describes the engine at `base_url`: kind, models, slots.
pub async fn probe(client: &reqwest::Client, base_url: &str) -> Result<Engine, EngineError> {
    let base = base_url.trim_end_matches('/').to_owned();
    let models = get_json(client, &format!("{base}/v1/models")).await?;
    if !models["data"].is_array() {
        return Err(EngineError::Malformed {
            url: format!("{base}/v1/models"),
            why: "no `data` list".into(),
        });
    }
    // Ollama lists its models at /api/tags too (llama.cpp answers 404 there).
    let tags = get_json(client, &format!("{base}/api/tags")).await.ok();
    let kind = classify(
        &models,
        tags.as_ref().is_some_and(|t| t["models"].is_array()),
    );
    let mut list = parse_models(&models);
    if list.is_empty()
        && let Some(tags) = &tags
    {
        list = tags["models"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                Some(ModelInfo {
                    name: m["name"].as_str()?.to_owned(),
                    context_length: None,
                })
            })
            .take(troop_schemas::protocol::MAX_MODELS)
            .collect();
    }
    let slots = match kind {
        // llama.cpp says how many parallel slots it has.
        EngineKind::LlamaCpp => get_json(client, &format!("{base}/props"))
            .await
            .ok()
            .and_then(|p| p["total_slots"].as_u64())
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_SLOTS),
        _ => DEFAULT_SLOTS,
    };
    Ok(Engine {
        kind,
        base_url: base,
        models: list,
        slots,
    })
}

/// Tries `candidates` in order and returns the first engine that answers.
pub async fn detect(
    client: &reqwest::Client,
    candidates: &[(EngineKind, String)],
) -> Result<Engine, EngineError> {
    for (expected, url) in candidates {
        match probe(client, url).await {
            Ok(mut engine) => {
                // On a default port, the port says which engine it is when the answer does not.
                if engine.kind == EngineKind::OpenAiCompatible {
                    engine.kind = *expected;
                }
                return Ok(engine);
            }
            Err(e) => tracing::debug!(%url, error = %e, "no engine here"),
        }
    }
    Err(EngineError::NoneFound(
        candidates
            .iter()
            .map(|(_, u)| u.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

pub fn default_candidates() -> Vec<(EngineKind, String)> {
    DEFAULT_ENGINES
        .iter()
        .map(|(k, port)| (*k, format!("http://127.0.0.1:{port}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_by_owner() {
        let vllm = json!({"object": "list", "data": [{"id": "meta-llama/Llama-3.1-8B-Instruct", "owned_by": "vllm", "max_model_len": 131072}]});
        assert_eq!(classify(&vllm, false), EngineKind::Vllm);
        assert_eq!(
            parse_models(&vllm),
            vec![ModelInfo {
                name: "meta-llama/Llama-3.1-8B-Instruct".into(),
                context_length: Some(131_072)
            }]
        );
        let ollama =
            json!({"object": "list", "data": [{"id": "llama3.2:latest", "owned_by": "library"}]});
        assert_eq!(classify(&ollama, true), EngineKind::Ollama);
        assert_eq!(classify(&ollama, false), EngineKind::OpenAiCompatible);
        let garbage = json!({"data": [{"id": ""}, {"no_id": 1}, {"id": "x".repeat(300)}]});
        assert!(parse_models(&garbage).is_empty());
    }
}
