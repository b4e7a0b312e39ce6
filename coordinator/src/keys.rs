//! Consumer API keys. A key is shown once, at creation; the coordinator keeps
//! only a keyed BLAKE3 hash of its secret and compares hashes in constant time.
//! Issue and revocation are events in the event log, replayed on start.
//!
//! Key format: `troop-sk-<key id hex>-<secret base64url>`. The id is public (it
//! finds the record); only the secret authenticates.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;
use troop_schemas::{AccountId, ApiKeyId};

/// Event-log tag of key events (ledger entries are 0x01).
pub const TAG_KEY_EVENT: u8 = 0x02;
const PREFIX: &str = "troop-sk-";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyEvent {
    Issued {
        key: ApiKeyId,
        account: AccountId,
        hash: String,
        at_ms: u64,
    },
    Revoked {
        key: ApiKeyId,
        at_ms: u64,
    },
}

impl KeyEvent {
    pub fn to_record(&self) -> Vec<u8> {
        let mut r = vec![TAG_KEY_EVENT];
        r.extend(serde_json::to_vec(self).expect("key events serialize"));
        r
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    account: AccountId,
    hash: [u8; 32],
    revoked: bool,
}

/// The key table: a projection of key events.
#[derive(Debug)]
pub struct ApiKeys {
    hash_key: [u8; 32],
    keys: HashMap<ApiKeyId, Stored>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed API key")]
    Malformed,
    #[error("invalid API key")]
    Invalid,
    #[error("this API key has been revoked")]
    Revoked,
}

impl ApiKeys {
    /// `hash_key` is the coordinator's secret for hashing keys: a stolen table
    /// without it cannot be brute-forced offline.
    pub fn new(hash_key: [u8; 32]) -> Self {
        Self {
            hash_key,
            keys: HashMap::new(),
        }
    }

    fn hash(&self, secret: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.hash_key, secret).as_bytes()
    }

    /// The key table without the hashing key (which never leaves its file).
    pub fn table(&self) -> HashMap<ApiKeyId, Stored> {
        self.keys.clone()
    }

    pub fn into_table(self) -> HashMap<ApiKeyId, Stored> {
        self.keys
    }

    /// A table saved by [`ApiKeys::table`], under the same hashing key.
    pub fn with_table(hash_key: [u8; 32], keys: HashMap<ApiKeyId, Stored>) -> Self {
        Self { hash_key, keys }
    }

    /// Applies a replayed or newly committed event.
    pub fn apply(&mut self, event: &KeyEvent) {
        match event {
            KeyEvent::Issued {
                key, account, hash, ..
            } => {
                let mut h = [0u8; 32];
                if hex::decode_to_slice(hash, &mut h).is_ok() {
                    self.keys.insert(
                        *key,
                        Stored {
                            account: *account,
                            hash: h,
                            revoked: false,
                        },
                    );
                }
            }
            KeyEvent::Revoked { key, .. } => {
                if let Some(k) = self.keys.get_mut(key) {
                    k.revoked = true;
                }
            }
        }
    }

    /// Applies a raw event-log record if it is a key event.
    pub fn apply_record(&mut self, record: &[u8]) -> Result<(), String> {
        if let Some((&TAG_KEY_EVENT, body)) = record.split_first() {
            let event: KeyEvent = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            self.apply(&event);
        }
        Ok(())
    }

    /// Makes a new key for `account` from 48 random bytes (16 id, 32 secret):
    /// returns the secret to show once and the event to commit.
    pub fn issue(&self, account: AccountId, random: &[u8; 48], at_ms: u64) -> (String, KeyEvent) {
        let mut id = [0u8; 16];
        id.copy_from_slice(&random[..16]);
        let key = ApiKeyId(id);
        let secret = &random[16..];
        let token = format!("{PREFIX}{}-{}", hex::encode(id), B64URL.encode(secret));
        let hash = hex::encode(self.hash(secret));
        (
            token,
            KeyEvent::Issued {
                key,
                account,
                hash,
                at_ms,
            },
        )
    }

    /// The account a bearer token spends from.
    pub fn authenticate(&self, token: &str) -> Result<(ApiKeyId, AccountId), AuthError> {
        let rest = token.strip_prefix(PREFIX).ok_or(AuthError::Malformed)?;
        let (id_hex, secret_b64) = rest.split_once('-').ok_or(AuthError::Malformed)?;
        let mut id = [0u8; 16];
        hex::decode_to_slice(id_hex, &mut id).map_err(|_| AuthError::Malformed)?;
        let secret = B64URL
            .decode(secret_b64)
            .map_err(|_| AuthError::Malformed)?;
        if secret.len() != 32 {
            return Err(AuthError::Malformed);
        }
        let key = ApiKeyId(id);
        let stored = self.keys.get(&key).ok_or(AuthError::Invalid)?;
        if !bool::from(self.hash(&secret).ct_eq(&stored.hash)) {
            return Err(AuthError::Invalid);
        }
        if stored.revoked {
            return Err(AuthError::Revoked);
        }
        Ok((key, stored.account))
    }

    pub fn exists(&self, key: &ApiKeyId) -> bool {
        self.keys.contains_key(key)
    }

    /// The account `key` spends from, if it was ever issued.
    pub fn account_of(&self, key: &ApiKeyId) -> Option<AccountId> {
        self.keys.get(key).map(|k| k.account)
    }

    /// Puts a key as a cluster's directory holds it (its hash made under
    /// the same hashing key). A revoked key stays revoked: revocation is
    /// final, whatever order the copies arrive in.
    pub fn set(&mut self, key: ApiKeyId, account: AccountId, hash: [u8; 32], revoked: bool) {
        let revoked = revoked || self.keys.get(&key).is_some_and(|k| k.revoked);
        self.keys.insert(
            key,
            Stored {
                account,
                hash,
                revoked,
            },
        );
    }
}

/// The admin token is compared in constant time too.
pub fn admin_token_matches(expected: &str, given: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_authenticate_revoke_replay() {
        let mut keys = ApiKeys::new([7; 32]);
        let account = AccountId::derive(b"a");
        let (token, issued) = keys.issue(account, &[3; 48], 1);
        keys.apply(&issued);
        let (id, acct) = keys.authenticate(&token).expect("valid");
        assert_eq!(acct, account);
        assert!(
            !format!("{issued:?}").contains(&token[token.len() - 20..]),
            "the secret is never stored"
        );

        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(
            keys.authenticate(&forged),
            Err(AuthError::Invalid | AuthError::Malformed)
        ));
        assert_eq!(
            keys.authenticate("sk-openai-style"),
            Err(AuthError::Malformed)
        );

        let revoked = KeyEvent::Revoked { key: id, at_ms: 2 };
        // Replay from records, as on start.
        let mut again = ApiKeys::new([7; 32]);
        again.apply_record(&issued.to_record()).expect("record");
        again.apply_record(&revoked.to_record()).expect("record");
        again
            .apply_record(&[0x01, b'{'])
            .expect("ledger records are not ours");
        assert_eq!(again.authenticate(&token), Err(AuthError::Revoked));

        // Another coordinator secret: the same table authenticates nothing.
        let mut other = ApiKeys::new([8; 32]);
        other.apply(&issued);
        assert_eq!(other.authenticate(&token), Err(AuthError::Invalid));
    }

    #[test]
    fn admin_tokens_compare_exactly() {
        assert!(admin_token_matches("s3cret", "s3cret"));
        assert!(!admin_token_matches("s3cret", "s3cre"));
        assert!(
            !admin_token_matches("", ""),
            "an unset admin token opens nothing"
        );
    }
}
