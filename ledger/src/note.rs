//! C2SP signed notes with Ed25519 keys, and C2SP tlog-checkpoint bodies.
//!
//! Key ID = SHA-256(name || 0x0A || 0x01 || public key)[:4]; verifier keys are
//! written `name+hex(keyid)+base64(0x01||pubkey)`, signer keys
//! `PRIVATE+KEY+name+hex(keyid)+base64(0x01||seed)`, as Go's sumdb/note does.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::hash::Hash;

const ALG_ED25519: u8 = 0x01;
/// U+2014 EM DASH and a space start every signature line.
const SIG_PREFIX: &str = "\u{2014} ";
/// Generous bounds: a note is a few lines, checkpoints carry a handful of cosignatures.
pub const MAX_NOTE_BYTES: usize = 1 << 20;
pub const MAX_SIGNATURES: usize = 100;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    Key(&'static str),
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("note has no signature by {0}")]
    Unsigned(String),
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    #[error("malformed checkpoint: {0}")]
    Checkpoint(&'static str),
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('+')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

pub fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0x0A, ALG_ED25519]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// Signs notes as one named key. Cloned for each term of a cluster's
/// sequencer (the key stays in this process).
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    id: [u8; 4],
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the seed.
        write!(f, "NoteSigner({}+{})", self.name, hex_id(&self.id))
    }
}

fn hex_id(id: &[u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl NoteSigner {
    pub fn new(name: &str, key: SigningKey) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key(
                "name must be non-empty, without '+' or spaces",
            ));
        }
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(Self {
            name: name.to_owned(),
            id,
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// `PRIVATE+KEY+name+keyid+base64(0x01||seed)`.
    pub fn to_key_string(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(&self.key.to_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex_id(&self.id),
            B64.encode(raw)
        )
    }

    pub fn from_key_string(s: &str) -> Result<Self, NoteError> {
        let rest = s
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::Key("missing PRIVATE+KEY+"))?;
        let (name, id, raw) = split_key(rest)?;
        let seed: [u8; 32] = raw
            .try_into()
            .map_err(|_| NoteError::Key("seed must be 32 bytes"))?;
        let signer = Self::new(name, SigningKey::from_bytes(&seed))?;
        if signer.id != id {
            return Err(NoteError::Key("key id does not match name and key"));
        }
        Ok(signer)
    }

    /// Signs `text` (which must end in a newline) and returns the whole note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        let sig = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            B64.encode(blob)
        ))
    }
}

fn split_key(s: &str) -> Result<(&str, [u8; 4], Vec<u8>), NoteError> {
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NoteError::Key("expected name+keyid+key"));
    };
    if id_hex.len() != 8 {
        return Err(NoteError::Key("key id must be 8 hex digits"));
    }
    let id_val =
        u32::from_str_radix(id_hex, 16).map_err(|_| NoteError::Key("key id must be hex"))?;
    let raw = B64
        .decode(b64)
        .map_err(|_| NoteError::Key("key must be base64"))?;
    let (alg, key) = raw.split_first().ok_or(NoteError::Key("empty key"))?;
    if *alg != ALG_ED25519 {
        return Err(NoteError::Key("only Ed25519 (0x01) keys are supported"));
    }
    Ok((name, id_val.to_be_bytes(), key.to_vec()))
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if text.is_empty() || !text.ends_with('\n') {
        return Err(NoteError::Malformed("text must end with a newline"));
    }
    if text.contains("\n\n") {
        return Err(NoteError::Malformed("text must not contain a blank line"));
    }
    if text.chars().any(|c| c != '\n' && c.is_control()) {
        return Err(NoteError::Malformed(
            "text must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks notes signed by one named key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl NoteVerifier {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }

    /// `name+keyid+base64(0x01||pubkey)`.
    pub fn to_key_string(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{}+{}", self.name, hex_id(&self.id), B64.encode(raw))
    }

    pub fn from_key_string(s: &str) -> Result<Self, NoteError> {
        let (name, id, raw) = split_key(s.trim())?;
        if !valid_name(name) {
            return Err(NoteError::Key("bad key name"));
        }
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| NoteError::Key("public key must be 32 bytes"))?;
        let key =
            VerifyingKey::from_bytes(&bytes).map_err(|_| NoteError::Key("not an Ed25519 point"))?;
        if key.is_weak() {
            return Err(NoteError::Key("weak (small-order) public key"));
        }
        if key_id(name, &bytes) != id {
            return Err(NoteError::Key("key id does not match name and key"));
        }
        Ok(Self {
            name: name.to_owned(),
            id,
            key,
        })
    }

    /// Returns the note's text if it carries a valid signature by this key.
    /// Signatures by other keys are ignored, as the spec asks.
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        if note.len() > MAX_NOTE_BYTES {
            return Err(NoteError::Malformed("note too large"));
        }
        let split = note
            .rfind("\n\n")
            .ok_or(NoteError::Malformed("no blank line before signatures"))?;
        let text = &note[..=split];
        let sigs = &note[split + 2..];
        check_text(text)?;
        if !sigs.ends_with('\n') {
            return Err(NoteError::Malformed(
                "signature block must end with a newline",
            ));
        }
        let mut found = false;
        for (i, line) in sigs.lines().enumerate() {
            if i >= MAX_SIGNATURES {
                return Err(NoteError::Malformed("too many signatures"));
            }
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or(NoteError::Malformed("bad signature line"))?;
            let (name, b64) = rest
                .rsplit_once(' ')
                .ok_or(NoteError::Malformed("bad signature line"))?;
            let blob = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed("signature is not base64"))?;
            if blob.len() < 4 {
                return Err(NoteError::Malformed("signature too short"));
            }
            if name != self.name || blob[..4] != self.id {
                continue;
            }
            let sig = ed25519_dalek::Signature::from_slice(&blob[4..])
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            self.key
                .verify_strict(text.as_bytes(), &sig)
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
            found = true;
        }
        if found {
            Ok(text)
        } else {
            Err(NoteError::Unsigned(self.name.clone()))
        }
    }
}

/// A C2SP tlog-checkpoint body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub extensions: Vec<String>,
}

impl Checkpoint {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            self.root.to_base64()
        );
        for e in &self.extensions {
            s.push_str(e);
            s.push('\n');
        }
        s
    }

    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(NoteError::Checkpoint("must end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::Checkpoint("no origin"))?;
        let size_s = lines.next().ok_or(NoteError::Checkpoint("no size"))?;
        if size_s.is_empty() || (size_s.len() > 1 && size_s.starts_with('0')) {
            return Err(NoteError::Checkpoint(
                "size must be decimal without leading zeros",
            ));
        }
        let size = size_s
            .parse::<u64>()
            .map_err(|_| NoteError::Checkpoint("size is not a number"))?;
        let root_s = lines.next().ok_or(NoteError::Checkpoint("no root hash"))?;
        let root = Hash::from_base64(root_s)
            .ok_or(NoteError::Checkpoint("root is not base64 of 32 bytes"))?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(NoteError::Checkpoint("empty extension line"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
            extensions,
        })
    }

    /// Opens a signed checkpoint note: verifies the signature and that the
    /// origin line names the verifier's log.
    pub fn open(note: &str, verifier: &NoteVerifier) -> Result<Self, NoteError> {
        let cp = Self::parse(verifier.open(note)?)?;
        if cp.origin != verifier.name() {
            return Err(NoteError::Checkpoint(
                "origin does not match the key's name",
            ));
        }
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> NoteSigner {
        NoteSigner::new("example.com/log", SigningKey::from_bytes(&[3; 32])).expect("signer")
    }

    #[test]
    fn sign_and_open_round_trip() {
        let s = signer();
        let cp = Checkpoint {
            origin: "example.com/log".into(),
            size: 5,
            root: Hash([9; 32]),
            extensions: vec![],
        };
        let note = s.sign(&cp.to_text()).expect("sign");
        let v = NoteVerifier::from_key_string(&s.verifier().to_key_string()).expect("vkey");
        assert_eq!(Checkpoint::open(&note, &v), Ok(cp));
        let again = NoteSigner::from_key_string(&s.to_key_string()).expect("skey");
        assert_eq!(again.verifier(), v);
    }

    #[test]
    fn tampering_is_caught() {
        let s = signer();
        let note = s
            .sign("example.com/log\n5\nCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n")
            .expect("sign");
        let v = s.verifier();
        let forged = note.replacen("\n5\n", "\n6\n", 1);
        assert_eq!(
            v.open(&forged),
            Err(NoteError::BadSignature("example.com/log".into()))
        );
        let other =
            NoteSigner::new("example.com/log", SigningKey::from_bytes(&[4; 32])).expect("signer");
        assert!(matches!(
            other.verifier().open(&note),
            Err(NoteError::Unsigned(_))
        ));
        assert!(v.open("no blank line\n").is_err());
    }

    #[test]
    fn keys_with_wrong_ids_are_refused() {
        let s = signer().verifier().to_key_string();
        let bad = s.replacen('+', "x+", 1);
        assert!(NoteVerifier::from_key_string(&bad).is_err());
    }
}
