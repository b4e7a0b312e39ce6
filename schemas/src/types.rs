//! Newtypes for ids, keys, digests and amounts. Each has one textual form on the wire.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::canonical::MAX_SAFE_INTEGER;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("expected `{prefix}_` followed by 32 lowercase hex digits, got {got:?}")]
    Id { prefix: &'static str, got: String },
    #[error("expected base64 of {len} bytes")]
    Base64 { len: usize },
    #[error("expected 64 lowercase hex digits")]
    Digest,
}

/// Serializes a type as its `Display` string and parses it back with `FromStr`:
/// one textual form on the wire, validated on the way in.
macro_rules! serde_via_str {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! id128 {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// Derives an id from arbitrary bytes, domain-separated by the id's kind,
            /// so that the same seed never yields two kinds of id that collide.
            pub fn derive(seed: &[u8]) -> Self {
                let mut hasher = blake3::Hasher::new_derive_key(concat!("troop id v1 ", $prefix));
                hasher.update(seed);
                let mut out = [0u8; 16];
                out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
                Self(out)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; 32];
                hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
                f.write_str($prefix)?;
                f.write_str("_")?;
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                let err = || ParseError::Id { prefix: $prefix, got: s.chars().take(80).collect() };
                let rest = s
                    .strip_prefix($prefix)
                    .and_then(|r| r.strip_prefix('_'))
                    .ok_or_else(err)?;
                if rest.len() != 32 || !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(err());
                }
                let mut out = [0u8; 16];
                hex::decode_to_slice(rest, &mut out).map_err(|_| err())?;
                Ok(Self(out))
            }
        }

        serde_via_str!($name);
    };
}

id128!(
    /// A credit account: a consumer's, a worker's, or the treasury.
    AccountId,
    "acct"
);
id128!(
    /// A worker, derived from its Ed25519 public key (see [`WorkerId::from_key`]).
    WorkerId,
    "wrk"
);
id128!(
    /// One inference job (one API request).
    JobId,
    "job"
);
id128!(
    /// A two-phase reservation of credits on an account.
    HoldId,
    "hold"
);
id128!(
    /// An API key; the secret itself is never stored, only a keyed hash of it.
    ApiKeyId,
    "key"
);

impl AccountId {
    /// The treasury: the one account allowed a negative balance. Grants and rewards
    /// are minted from it and fees return to it, so all balances always sum to zero.
    pub const TREASURY: AccountId = AccountId([0; 16]);
}

impl WorkerId {
    /// A worker's id is a hash of its key: a worker cannot claim another's id.
    pub fn from_key(key: &PublicKey) -> Self {
        Self::derive(&key.0)
    }
}

macro_rules! b64_bytes {
    ($(#[$doc:meta])* $name:ident, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; $len]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&B64.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                let bytes = B64.decode(s).map_err(|_| ParseError::Base64 { len: $len })?;
                let arr: [u8; $len] = bytes.try_into().map_err(|_| ParseError::Base64 { len: $len })?;
                Ok(Self(arr))
            }
        }

        serde_via_str!($name);
    };
}

b64_bytes!(
    /// An Ed25519 public key, standard base64 on the wire.
    PublicKey,
    32
);
b64_bytes!(
    /// An Ed25519 signature, standard base64 on the wire.
    Signature,
    64
);

/// A BLAKE3 digest, lowercase hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ParseError::Digest);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseError::Digest)?;
        Ok(Self(out))
    }
}

serde_via_str!(Digest);

/// An amount of credits in millionths of a credit. Never a float.
///
/// Bounded by 2^53-1 so that every amount survives canonical JSON in any language.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct CreditsMicro(u64);

impl CreditsMicro {
    pub const ZERO: CreditsMicro = CreditsMicro(0);
    pub const MAX: CreditsMicro = CreditsMicro(MAX_SAFE_INTEGER);
    pub const PER_CREDIT: u64 = 1_000_000;

    pub const fn new(micro: u64) -> Option<Self> {
        if micro > MAX_SAFE_INTEGER {
            None
        } else {
            Some(Self(micro))
        }
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).and_then(Self::new)
    }

    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }
}

impl fmt::Debug for CreditsMicro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µc", self.0)
    }
}

impl fmt::Display for CreditsMicro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:06}",
            self.0 / Self::PER_CREDIT,
            self.0 % Self::PER_CREDIT
        )
    }
}

impl<'de> Deserialize<'de> for CreditsMicro {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        Self::new(v).ok_or_else(|| serde::de::Error::custom("amount above 2^53-1 micro-credits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = AccountId::derive(b"alice");
        let text = id.to_string();
        assert!(text.starts_with("acct_") && text.len() == 37);
        assert_eq!(text.parse::<AccountId>(), Ok(id));
        assert!("acct_XYZ".parse::<AccountId>().is_err());
        assert!(text.to_uppercase().parse::<AccountId>().is_err());
        assert!(text.replace("acct_", "hold_").parse::<AccountId>().is_err());
        // Domain separation: the same seed gives unrelated ids of other kinds.
        assert_ne!(AccountId::derive(b"x").0, HoldId::derive(b"x").0);
    }

    #[test]
    fn credits_are_bounded_and_formatted() {
        assert_eq!(
            CreditsMicro::new(1_500_000).map(|c| c.to_string()),
            Some("1.500000".into())
        );
        assert!(CreditsMicro::new(MAX_SAFE_INTEGER + 1).is_none());
        assert!(CreditsMicro::MAX.checked_add(CreditsMicro(1)).is_none());
        assert!(serde_json::from_str::<CreditsMicro>("9007199254740992").is_err());
        assert!(serde_json::from_str::<CreditsMicro>("1.5").is_err());
        assert!(serde_json::from_str::<CreditsMicro>("-1").is_err());
    }

    #[test]
    fn keys_are_base64_of_exact_length() {
        let k = PublicKey([7; 32]);
        assert_eq!(k.to_string().parse::<PublicKey>(), Ok(k));
        assert!("AAAA".parse::<PublicKey>().is_err());
    }
}
