//! `c2sp.org/tlog-proof@v1`: an offline-verifiable proof that one entry is in
//! the log, carrying the signed checkpoint it is proved against.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::hash::{Hash, leaf_hash};
use crate::merkle::{self, HashReader, ProofError};
use crate::note::{Checkpoint, NoteError, NoteVerifier};

const HEADER: &str = "c2sp.org/tlog-proof@v1";
/// A tree of 2^64 leaves needs 64 hashes; anything longer is garbage.
const MAX_PATH: usize = 64;
const MAX_PROOF_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TlogProofError {
    #[error("malformed proof: {0}")]
    Malformed(&'static str),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] NoteError),
    #[error("inclusion: {0}")]
    Inclusion(#[from] ProofError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlogProof {
    pub extra: Option<Vec<u8>>,
    pub index: u64,
    pub path: Vec<Hash>,
    /// The signed checkpoint note, verbatim.
    pub checkpoint: String,
}

impl TlogProof {
    /// Builds the proof of entry `index` against a signed checkpoint, reading
    /// hashes from `reader` (which must serve the checkpoint's tree size).
    pub fn build<R: HashReader + ?Sized>(
        reader: &R,
        checkpoint_note: &str,
        checkpoint: &Checkpoint,
        index: u64,
    ) -> Result<Self, TlogProofError> {
        let path = merkle::inclusion_proof(reader, index, checkpoint.size)?;
        Ok(Self {
            extra: None,
            index,
            path,
            checkpoint: checkpoint_note.to_owned(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut s = format!("{HEADER}\n");
        if let Some(extra) = &self.extra {
            s.push_str(&format!("extra {}\n", B64.encode(extra)));
        }
        s.push_str(&format!("index {}\n", self.index));
        for h in &self.path {
            s.push_str(&h.to_base64());
            s.push('\n');
        }
        s.push('\n');
        s.push_str(&self.checkpoint);
        s
    }

    pub fn parse(text: &str) -> Result<Self, TlogProofError> {
        use TlogProofError::Malformed;
        if text.len() > MAX_PROOF_BYTES {
            return Err(Malformed("proof too large"));
        }
        let (head, checkpoint) = text
            .split_once("\n\n")
            .ok_or(Malformed("no blank line before the checkpoint"))?;
        let mut lines = head.split('\n');
        if lines.next() != Some(HEADER) {
            return Err(Malformed("first line must be c2sp.org/tlog-proof@v1"));
        }
        let mut line = lines.next().ok_or(Malformed("no index line"))?;
        let mut extra = None;
        if let Some(b64) = line.strip_prefix("extra ") {
            extra = Some(
                B64.decode(b64)
                    .map_err(|_| Malformed("extra is not base64"))?,
            );
            line = lines.next().ok_or(Malformed("no index line"))?;
        }
        let index_s = line
            .strip_prefix("index ")
            .ok_or(Malformed("expected `index N`"))?;
        if index_s.is_empty() || (index_s.len() > 1 && index_s.starts_with('0')) {
            return Err(Malformed("index must be decimal without leading zeros"));
        }
        let index = index_s
            .parse()
            .map_err(|_| Malformed("index is not a number"))?;
        let mut path = Vec::new();
        for l in lines {
            if path.len() == MAX_PATH {
                return Err(Malformed("too many hashes"));
            }
            path.push(Hash::from_base64(l).ok_or(Malformed("hash is not base64 of 32 bytes"))?);
        }
        Ok(Self {
            extra,
            index,
            path,
            checkpoint: checkpoint.to_owned(),
        })
    }

    /// Checks the checkpoint's signature and that `entry` is at `index` in it.
    pub fn verify(
        &self,
        entry: &[u8],
        verifier: &NoteVerifier,
    ) -> Result<Checkpoint, TlogProofError> {
        let cp = Checkpoint::open(&self.checkpoint, verifier)?;
        merkle::verify_inclusion(&leaf_hash(entry), self.index, cp.size, &self.path, &cp.root)?;
        Ok(cp)
    }
}
