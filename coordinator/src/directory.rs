//! Directory records: what rides in a home's log beside the ledger entries
//! without moving money — API keys (in their account's log) and worker bans
//! (in the worker's). Nothing judges them as money, but they go through the
//! same port ([`crate::money::Money::append`]) so that in a cluster they have
//! one writer per partition, like everything else in the ledger topic. The
//! embedded books replay them from the event log on start
//! ([`crate::snapshot`]); a cluster's sequencer projects them into Postgres
//! (`api_keys`, `bans`) in the batch's transaction, and every node refreshes
//! its copy from there ([`crate::cluster::directory`]).

use serde::{Deserialize, Serialize};
use troop_schemas::WorkerId;

pub use crate::keys::{KeyEvent, TAG_KEY_EVENT};

/// Event-log tag of worker bans (ledger entries are 0x01, keys 0x02).
pub const TAG_BAN_EVENT: u8 = 0x03;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BanEvent {
    Banned { worker: WorkerId, at_ms: u64 },
}

impl BanEvent {
    pub fn to_record(&self) -> Vec<u8> {
        let mut r = vec![TAG_BAN_EVENT];
        r.extend(serde_json::to_vec(self).expect("ban events serialize"));
        r
    }
}

/// One directory record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Directory {
    Key(KeyEvent),
    Ban(BanEvent),
}

impl Directory {
    /// The event-log record: its tag, then its JSON.
    pub fn to_record(&self) -> Vec<u8> {
        match self {
            Self::Key(k) => k.to_record(),
            Self::Ban(b) => b.to_record(),
        }
    }

    /// The directory record `payload` holds; `None` if it holds something
    /// else (a ledger entry, a worker event).
    pub fn from_record(payload: &[u8]) -> Option<Result<Self, String>> {
        let (tag, body) = payload.split_first()?;
        let parsed = match *tag {
            TAG_KEY_EVENT => serde_json::from_slice(body).map(Self::Key),
            TAG_BAN_EVENT => serde_json::from_slice(body).map(Self::Ban),
            _ => return None,
        };
        Some(parsed.map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use troop_schemas::{AccountId, ApiKeyId};

    use super::*;

    #[test]
    fn records_read_back_as_written_and_others_are_not_ours() {
        let key = Directory::Key(KeyEvent::Issued {
            key: ApiKeyId([1; 16]),
            account: AccountId::derive(b"a"),
            hash: "00".repeat(32),
            at_ms: 5,
        });
        let ban = Directory::Ban(BanEvent::Banned {
            worker: WorkerId::derive(b"w"),
            at_ms: 6,
        });
        for d in [key, ban] {
            assert_eq!(Directory::from_record(&d.to_record()), Some(Ok(d)));
        }
        assert_eq!(Directory::from_record(&[0x01, b'{']), None);
        assert_eq!(Directory::from_record(&[]), None);
        assert!(matches!(
            Directory::from_record(&[TAG_BAN_EVENT, b'{']),
            Some(Err(_))
        ));
    }
}
