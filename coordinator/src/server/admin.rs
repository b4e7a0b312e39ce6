//! The admin API: every operator action, behind its own bearer token.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use troop_schemas::{AccountId, AccountRole, CreditsMicro, Event};

use super::{AppState, commit_as, commit_one, error_response, now_ms, random};
use crate::api::openai::ApiError;
use crate::directory::{BanEvent, Directory};
use crate::keys::admin_token_matches;
use crate::money::{Home, MoneyError};
use crate::reads::MAX_LIST_ACCOUNTS;

/// How long the admin API waits for a read to catch up with a change.
const READ_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(3);

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if admin_token_matches(&state.config.admin_token, given) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("A valid admin token is required."))
    }
}

fn refused(e: impl std::fmt::Display) -> HttpResponse {
    error_response(&ApiError::invalid("body", e.to_string()))
}

/// Appends a directory record to `home`'s log; returns once it is durable,
/// or the error to answer instead.
async fn append(state: &AppState, home: Home, record: Directory) -> Result<(), ApiError> {
    state
        .money
        .append(home, vec![record])
        .await
        .map_err(|e| match e {
            MoneyError::Unavailable(why) => ApiError::unavailable(why),
            other => ApiError::not_durable(other.to_string()),
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    #[serde(default)]
    pub role: Option<AccountRole>,
}

pub async fn open_account(
    req: HttpRequest,
    body: web::Json<NewAccount>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let account = AccountId(random::<16>());
    let role = body.role.unwrap_or(AccountRole::Consumer);
    match commit_one(
        &state,
        Home::Account(account),
        Event::AccountOpened {
            account,
            role,
            at_ms: now_ms(),
        },
    )
    .await
    {
        Ok(index) => HttpResponse::Created()
            .json(json!({"account": account.to_string(), "role": role, "ledger_index": index})),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    pub account: AccountId,
    pub amount_micro: u64,
    #[serde(default)]
    pub memo: String,
}

pub async fn grant(
    req: HttpRequest,
    body: web::Json<NewGrant>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let Some(amount) = CreditsMicro::new(body.amount_micro) else {
        return refused("amount_micro is above 2^53-1");
    };
    let event = Event::Grant {
        account: body.account,
        amount_micro: amount,
        memo: body.memo.clone(),
        at_ms: now_ms(),
    };
    match commit_as(&state, body.account, event).await {
        Ok(index) => HttpResponse::Created().json(json!({"ledger_index": index})),
        Err(e) => refused(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub account: AccountId,
}

pub async fn issue_key(
    req: HttpRequest,
    body: web::Json<NewKey>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    // A cluster's reads follow the sequencer: an account opened a moment
    // ago through another node may not be read yet, so look again for a
    // while before saying it does not exist.
    let deadline = std::time::Instant::now() + READ_CATCH_UP;
    let known = loop {
        match state.reads.account(body.account).await {
            Ok(Some(_)) => break true,
            Ok(None) if std::time::Instant::now() >= deadline => break false,
            Ok(None) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Err(e) => return error_response(&ApiError::unavailable(e.to_string())),
        }
    };
    if !known {
        return refused(format!("account {} does not exist", body.account));
    }
    let (token, event) =
        state
            .keys
            .read()
            .expect("keys lock")
            .issue(body.account, &random::<48>(), now_ms());
    // Durable before it is shown, as every decision.
    let home = Home::Account(body.account);
    if let Err(e) = append(&state, home, Directory::Key(event.clone())).await {
        return error_response(&e);
    }
    state.keys.write().expect("keys lock").apply(&event);
    let crate::keys::KeyEvent::Issued { key, .. } = event else {
        unreachable!("issue makes Issued")
    };
    HttpResponse::Created()
        .json(json!({"key": key.to_string(), "secret": token, "account": body.account.to_string()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeKey {
    pub key: troop_schemas::ApiKeyId,
}

pub async fn revoke_key(
    req: HttpRequest,
    body: web::Json<RevokeKey>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let Some(account) = state.keys.read().expect("keys lock").account_of(&body.key) else {
        return error_response(&ApiError {
            status: 404,
            ..ApiError::invalid("key", format!("No key {}.", body.key))
        });
    };
    let event = crate::keys::KeyEvent::Revoked {
        key: body.key,
        at_ms: now_ms(),
    };
    // In the key's account's log, after its issue.
    if let Err(e) = append(
        &state,
        Home::Account(account),
        Directory::Key(event.clone()),
    )
    .await
    {
        return error_response(&e);
    }
    state.keys.write().expect("keys lock").apply(&event);
    HttpResponse::Ok().json(json!({"key": body.key.to_string(), "revoked": true}))
}

/// `GET /admin/accounts?after=ID&limit=N`: one page in id order; the answer
/// names `next_after` while there may be more.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsPage {
    #[serde(default)]
    pub after: Option<AccountId>,
    #[serde(default)]
    pub limit: Option<usize>,
}

pub async fn list_accounts(
    req: HttpRequest,
    page: web::Query<AccountsPage>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let limit = page
        .limit
        .unwrap_or(MAX_LIST_ACCOUNTS)
        .clamp(1, MAX_LIST_ACCOUNTS);
    let accounts = match state.reads.accounts(page.after, limit).await {
        Ok(a) => a,
        Err(e) => return error_response(&ApiError::unavailable(e.to_string())),
    };
    let next_after = (accounts.len() == limit)
        .then(|| accounts.last().map(|(id, _)| id.to_string()))
        .flatten();
    let list: Vec<_> = accounts
        .into_iter()
        .map(|(id, a)| {
            json!({"account": id.to_string(), "role": a.role, "balance_micro": a.balance().to_string(),
                "pending_micro": a.debits_pending.to_string(), "available_micro": a.available().to_string()})
        })
        .collect();
    HttpResponse::Ok().json(json!({"accounts": list, "next_after": next_after}))
}

/// `GET /admin/workers`: every connected worker. On a cluster node, every
/// live node's (each tagged with its node); `nodes` says how each answered
/// and `complete` whether all did, so a node that did not is never silently
/// left out.
pub async fn list_workers(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let mine = state
        .registry
        .send(crate::actors::registry::ListWorkers)
        .await
        .unwrap_or_default();
    let listed = match &state.peers {
        Some(peers) => peers.workers(mine).await,
        None => crate::cluster::peers::ClusterWorkers {
            workers: mine,
            ..Default::default()
        },
    };
    let complete = listed.complete();
    let crate::cluster::peers::ClusterWorkers {
        mut workers,
        nodes,
        error,
    } = listed;
    // A worker that just moved may show on two nodes for a moment.
    workers.sort_by(|a, b| (&a.worker, &a.node).cmp(&(&b.worker, &b.node)));
    for chunk in workers.chunks_mut(crate::history::MAX_RECORDS_READ) {
        let ids: Vec<Option<troop_schemas::WorkerId>> =
            chunk.iter().map(|w| w.worker.parse().ok()).collect();
        let wanted = ids.iter().flatten().copied().collect();
        match state.worker_events.log.records(wanted).await {
            Ok(records) => {
                for (w, id) in chunk.iter_mut().zip(ids) {
                    w.history = id.and_then(|id| records.get(&id).cloned());
                }
            }
            // The live list is still worth showing without its history.
            Err(e) => tracing::warn!(error = %e, "reading worker history"),
        }
    }
    let mut answer = json!({"workers": workers, "complete": complete});
    if state.peers.is_some() {
        answer["nodes"] = json!(nodes);
    }
    if let Some(error) = error {
        answer["error"] = json!(error);
    }
    HttpResponse::Ok().json(answer)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanWorker {
    pub worker: troop_schemas::WorkerId,
}

pub async fn ban_worker(
    req: HttpRequest,
    body: web::Json<BanWorker>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let ban = BanEvent::Banned {
        worker: body.worker,
        at_ms: now_ms(),
    };
    if let Err(e) = append(&state, Home::Worker(body.worker), Directory::Ban(ban)).await {
        return error_response(&e);
    }
    state.bans.write().expect("bans lock").insert(body.worker);
    state
        .registry
        .do_send(crate::actors::registry::Ban(body.worker));
    HttpResponse::Ok().json(json!({"worker": body.worker.to_string(), "banned": true}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPrices {
    pub fee_bps: u64,
    pub prices: Vec<crate::config::PriceConfig>,
}

pub async fn set_prices(
    req: HttpRequest,
    body: web::Json<SetPrices>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Err(e) = authorize(&req, &state) {
        return error_response(&e);
    }
    let current = state.schedule.get();
    let mut prices = Vec::new();
    for p in &body.prices {
        let (Some(input), Some(output)) = (
            CreditsMicro::new(p.input_micro_per_1k),
            CreditsMicro::new(p.output_micro_per_1k),
        ) else {
            return refused("price above 2^53-1");
        };
        prices.push(troop_schemas::ModelPrice {
            model: p.model.clone(),
            input_micro_per_1k: input,
            output_micro_per_1k: output,
        });
    }
    let version = current.map_or(0, |s| s.version) + 1;
    let event = Event::PriceSchedulePublished {
        version,
        fee_bps: body.fee_bps,
        prices,
        at_ms: now_ms(),
    };
    match commit_one(&state, Home::Network, event).await {
        Ok(index) => HttpResponse::Ok().json(json!({"version": version, "ledger_index": index})),
        Err(e) => refused(e),
    }
}
