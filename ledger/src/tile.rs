//! C2SP tlog-tiles: paths, entry bundles, the tile-shaped right edge of a tree
//! ([`TileTree`]) and a [`HashReader`] over published tiles ([`TileHashReader`]).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::hash::{HASH_BYTES, Hash, node_hash};
use crate::merkle::{HashReader, ProofError};

/// Tiles are 8 levels high, so a full tile holds 2^8 = 256 hashes.
pub const TILE_HEIGHT: u8 = 8;
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
const TILE_WIDTH_USIZE: usize = 1 << TILE_HEIGHT;

/// A hash tile (`level` ≥ 0) or an entry bundle (`level` = None): the
/// `index`-th of its level, holding `width` (1..=256) hashes or entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileId {
    pub level: Option<u8>,
    pub index: u64,
    pub width: u16,
}

impl TileId {
    pub fn hashes(level: u8, index: u64, width: u16) -> Self {
        assert!(
            (1..=256).contains(&width),
            "tile width {width} out of range"
        );
        Self {
            level: Some(level),
            index,
            width,
        }
    }

    pub fn entries(index: u64, width: u16) -> Self {
        assert!(
            (1..=256).contains(&width),
            "bundle width {width} out of range"
        );
        Self {
            level: None,
            index,
            width,
        }
    }

    pub fn is_full(&self) -> bool {
        u64::from(self.width) == TILE_WIDTH
    }

    /// `tile/<L>/<N>[.p/<W>]` or `tile/entries/<N>[.p/<W>]`.
    pub fn path(&self) -> String {
        let level = match self.level {
            Some(l) => l.to_string(),
            None => "entries".to_owned(),
        };
        let mut p = format!("tile/{level}/{}", encode_index(self.index));
        if !self.is_full() {
            p.push_str(&format!(".p/{}", self.width));
        }
        p
    }

    /// The tile a path names, exactly as [`TileId::path`] writes it (no
    /// leading zeros beyond the 3-digit groups, no `.p/256`), so that one tile
    /// has one path: a store that derives files from its rows answers each
    /// name once.
    pub fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("tile/")?;
        let (level, rest) = rest.split_once('/')?;
        let level = match level {
            "entries" => None,
            l if l.len() <= 2 && l.bytes().all(|b| b.is_ascii_digit()) => Some(l.parse().ok()?),
            _ => return None,
        };
        let (index, width) = match rest.split_once(".p/") {
            Some((index, width)) => {
                if width.is_empty() || width.starts_with('0') || width.len() > 3 {
                    return None;
                }
                let width: u16 = width.parse().ok()?;
                if !(1..256).contains(&width) {
                    return None;
                }
                (index, width)
            }
            None => (rest, 256),
        };
        let mut n: u64 = 0;
        let groups: Vec<&str> = index.split('/').collect();
        let last = groups.len() - 1;
        for (i, g) in groups.iter().enumerate() {
            let digits = if i < last { g.strip_prefix('x')? } else { g };
            if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            n = n.checked_mul(1000)?.checked_add(digits.parse().ok()?)?;
        }
        let id = Self {
            level,
            index: n,
            width,
        };
        // Rejects non-canonical spellings such as a leading `x000/` group.
        (id.path() == path).then_some(id)
    }

    /// The tile of `level` (None: entry bundle) containing position `index`
    /// at that level, as published for a tree of `size` leaves.
    pub fn for_size(level: Option<u8>, tile_index: u64, size: u64) -> Option<Self> {
        let shift = u32::from(level.unwrap_or(0)) * u32::from(TILE_HEIGHT);
        let count = size.checked_shr(shift).unwrap_or(0);
        let start = tile_index.checked_mul(TILE_WIDTH)?;
        if count <= start {
            return None;
        }
        let width = (count - start).min(TILE_WIDTH);
        // width ≤ 256 by the min above.
        let width = u16::try_from(width).expect("width ≤ 256");
        Some(Self {
            level,
            index: tile_index,
            width,
        })
    }
}

/// `1234067` → `x001/x234/067`.
fn encode_index(n: u64) -> String {
    let s = n.to_string();
    let pad = (3 - s.len() % 3) % 3;
    let padded = format!("{}{s}", "0".repeat(pad));
    let groups: Vec<&str> = padded
        .as_bytes()
        .chunks(3)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    let last = groups.len() - 1;
    groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            if i < last {
                format!("x{g}")
            } else {
                (*g).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Encodes entries as an entry bundle: big-endian u16 length, then the bytes.
pub fn encode_bundle<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        // Entries longer than u16::MAX are refused at append time.
        let len = u16::try_from(e.len()).expect("entry length checked at append");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("bundle is truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("bundle holds {got} entries, expected {want}")]
    Count { got: usize, want: usize },
}

/// Splits a bundle into its entries, refusing trailing bytes and wrong counts.
pub fn decode_bundle(bytes: &[u8], want: usize) -> Result<Vec<&[u8]>, BundleError> {
    let mut out = Vec::with_capacity(want);
    let mut at = 0;
    while at < bytes.len() {
        if out.len() == want {
            return Err(BundleError::Count {
                got: want + 1,
                want,
            });
        }
        let len_bytes = bytes
            .get(at..at + 2)
            .ok_or(BundleError::Truncated { offset: at })?;
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        let entry = bytes
            .get(at + 2..at + 2 + len)
            .ok_or(BundleError::Truncated { offset: at })?;
        out.push(entry);
        at += 2 + len;
    }
    if out.len() != want {
        return Err(BundleError::Count {
            got: out.len(),
            want,
        });
    }
    Ok(out)
}

pub fn encode_hashes(hashes: &[Hash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hashes.len() * HASH_BYTES);
    for h in hashes {
        out.extend_from_slice(&h.0);
    }
    out
}

pub fn decode_hashes(bytes: &[u8], want: usize) -> Option<Vec<Hash>> {
    if bytes.len() != want * HASH_BYTES {
        return None;
    }
    Some(
        bytes
            .chunks_exact(HASH_BYTES)
            .map(|c| Hash::from_slice(c).expect("32-byte chunk"))
            .collect(),
    )
}

/// The root of a power-of-two run of sibling hashes.
pub fn reduce(hashes: &[Hash]) -> Hash {
    assert!(
        hashes.len().is_power_of_two(),
        "reduce needs 2^k hashes, got {}",
        hashes.len()
    );
    let mut level: Vec<Hash> = hashes.to_vec();
    while level.len() > 1 {
        level = level
            .chunks_exact(2)
            .map(|p| node_hash(&p[0], &p[1]))
            .collect();
    }
    level[0]
}

/// The right edge of a tree, one partial tile per level: everything needed to
/// append and to compute the root, in O(256 × levels) memory.
///
/// `pending[L]` holds the level-8L hashes after the last full tile of level L.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TileTree {
    size: u64,
    pending: Vec<Vec<Hash>>,
}

impl TileTree {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one leaf hash; calls `full` with each hash tile it completes
    /// (at most one per level, lowest first).
    pub fn push(&mut self, leaf: Hash, mut full: impl FnMut(TileId, &[Hash])) {
        self.size += 1;
        let mut h = leaf;
        let mut level = 0usize;
        loop {
            if self.pending.len() == level {
                self.pending.push(Vec::with_capacity(TILE_WIDTH_USIZE));
            }
            self.pending[level].push(h);
            if self.pending[level].len() < TILE_WIDTH_USIZE {
                break;
            }
            let level_u8 = u8::try_from(level).expect("at most 8 tile levels in a u64 tree");
            let shift = u32::from(TILE_HEIGHT) * (u32::from(level_u8) + 1);
            let tile_index = (self.size >> shift) - 1;
            full(
                TileId::hashes(level_u8, tile_index, 256),
                &self.pending[level],
            );
            h = reduce(&self.pending[level]);
            self.pending[level].clear();
            level += 1;
        }
        debug_assert!(self.check_shape());
    }

    /// The partial tiles of the current size, lowest level first.
    pub fn partial_tiles(&self) -> impl Iterator<Item = (TileId, &[Hash])> {
        let size = self.size;
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.is_empty())
            .map(move |(l, p)| {
                let l = u8::try_from(l).expect("tile level fits u8");
                let index = size >> (u32::from(TILE_HEIGHT) * (u32::from(l) + 1));
                let width = u16::try_from(p.len()).expect("pending < 256");
                (TileId::hashes(l, index, width), p.as_slice())
            })
    }

    pub fn root(&self) -> Hash {
        crate::merkle::tree_hash(self, self.size)
            .expect("the right edge holds every node of the root")
    }

    /// Rebuilds the right edge from the partial tiles of a published size.
    pub fn from_partials(
        size: u64,
        mut read: impl FnMut(TileId) -> Option<Vec<Hash>>,
    ) -> Option<Self> {
        let mut pending = Vec::new();
        let mut level: u8 = 0;
        loop {
            let shift = u32::from(TILE_HEIGHT) * u32::from(level);
            let count = size.checked_shr(shift).unwrap_or(0);
            if count == 0 {
                break;
            }
            let width = count % TILE_WIDTH;
            if width == 0 {
                pending.push(Vec::with_capacity(TILE_WIDTH_USIZE));
            } else {
                let w16 = u16::try_from(width).expect("width < 256");
                let hashes = read(TileId::hashes(level, count / TILE_WIDTH, w16))?;
                if hashes.len() != usize::from(w16) {
                    return None;
                }
                pending.push(hashes);
            }
            level += 1;
        }
        let tree = Self { size, pending };
        tree.check_shape().then_some(tree)
    }

    fn check_shape(&self) -> bool {
        self.pending.iter().enumerate().all(|(l, p)| {
            let shift = u32::from(TILE_HEIGHT) * u32::try_from(l).unwrap_or(u32::MAX);
            p.len() as u64 == self.size.checked_shr(shift).unwrap_or(0) % TILE_WIDTH
        })
    }
}

impl HashReader for TileTree {
    fn node(&self, level: u8, index: u64) -> Result<Hash, ProofError> {
        let tile_level = level / TILE_HEIGHT;
        let rel = level % TILE_HEIGHT;
        let first = index << rel;
        let count = 1usize << rel;
        let shift = u32::from(TILE_HEIGHT) * u32::from(tile_level);
        let base = (self.size >> shift) & !(TILE_WIDTH - 1);
        let pending = self
            .pending
            .get(usize::from(tile_level))
            .ok_or_else(|| ProofError::Source(format!("no pending tile at level {tile_level}")))?;
        let start = first
            .checked_sub(base)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| s + count <= pending.len())
            .ok_or_else(|| {
                ProofError::Source(format!("node {level}/{index} is left of the right edge"))
            })?;
        Ok(reduce(&pending[start..start + count]))
    }
}

/// Where tiles and bundles come from: a directory, an HTTP prefix, memory.
pub trait TileSource: Sync {
    /// The bytes at `path` (relative to the log's base), or `None` if absent.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String>;
}

impl<S: TileSource + Send + ?Sized> TileSource for std::sync::Arc<S> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        (**self).read(path)
    }
}

impl<S: TileSource + ?Sized> TileSource for &S {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        (**self).read(path)
    }
}

/// Reads nodes of the tree of `size` from published hash tiles, caching tiles.
pub struct TileHashReader<'a, S: TileSource + ?Sized> {
    source: &'a S,
    size: u64,
    cache: Mutex<HashMap<TileId, Vec<Hash>>>,
}

impl<S: TileSource + ?Sized> std::fmt::Debug for TileHashReader<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileHashReader(size={})", self.size)
    }
}

/// Enough for every tile one proof touches, several times over.
const TILE_CACHE_ENTRIES: usize = 4096;

impl<'a, S: TileSource + ?Sized> TileHashReader<'a, S> {
    pub fn new(source: &'a S, size: u64) -> Self {
        Self {
            source,
            size,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn tile(&self, id: TileId) -> Result<Vec<Hash>, ProofError> {
        if let Some(t) = self.cache.lock().expect("cache lock").get(&id) {
            return Ok(t.clone());
        }
        let bytes = self
            .source
            .read(&id.path())
            .map_err(ProofError::Source)?
            .ok_or_else(|| ProofError::Source(format!("{} is missing", id.path())))?;
        let hashes = decode_hashes(&bytes, usize::from(id.width)).ok_or_else(|| {
            ProofError::Source(format!("{} has {} bytes", id.path(), bytes.len()))
        })?;
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= TILE_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(id, hashes.clone());
        Ok(hashes)
    }
}

impl<S: TileSource + ?Sized> HashReader for TileHashReader<'_, S> {
    fn node(&self, level: u8, index: u64) -> Result<Hash, ProofError> {
        let tile_level = level / TILE_HEIGHT;
        let rel = level % TILE_HEIGHT;
        let first = index << rel;
        let count = 1u64 << rel;
        let tile_index = first / TILE_WIDTH;
        let id = TileId::for_size(Some(tile_level), tile_index, self.size).ok_or_else(|| {
            ProofError::Source(format!("node {level}/{index} is beyond size {}", self.size))
        })?;
        let hashes = self.tile(id)?;
        let start = usize::try_from(first % TILE_WIDTH).expect("< 256");
        let end = start + usize::try_from(count).expect("≤ 128");
        let run = hashes.get(start..end).ok_or_else(|| {
            ProofError::Source(format!(
                "node {level}/{index} is not complete at size {}",
                self.size
            ))
        })?;
        Ok(reduce(run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;
    use crate::merkle::MemoryTree;

    #[test]
    fn paths_follow_the_spec() {
        assert_eq!(
            TileId::hashes(0, 1_234_067, 256).path(),
            "tile/0/x001/x234/067"
        );
        assert_eq!(TileId::hashes(1, 0, 17).path(), "tile/1/000.p/17");
        assert_eq!(TileId::entries(1000, 3).path(), "tile/entries/x001/000.p/3");
        assert_eq!(TileId::hashes(2, 999, 256).path(), "tile/2/999");
    }

    #[test]
    fn paths_parse_back_to_their_tile_and_nothing_else_parses() {
        for id in [
            TileId::hashes(0, 1_234_067, 256),
            TileId::hashes(1, 0, 17),
            TileId::entries(1000, 3),
            TileId::entries(0, 256),
            TileId::hashes(2, 999, 256),
            TileId::entries(u64::MAX / 2, 255),
        ] {
            assert_eq!(TileId::parse(&id.path()), Some(id), "{}", id.path());
        }
        for bad in [
            "",
            "checkpoint",
            "tile/entries",
            "tile/entries/",
            "tile/entries/1",
            "tile/entries/0001",
            "tile/entries/x000/001",
            "tile/entries/001.p/256",
            "tile/entries/001.p/0",
            "tile/entries/001.p/03",
            "tile/entries/001.p/",
            "tile/entries/x001",
            "tile/entries/001/002",
            "tile/x/001",
            "tile/256/001",
            "tile/entries/x1000/001",
            "tile/entries/00a",
        ] {
            assert_eq!(TileId::parse(bad), None, "{bad:?} parsed");
        }
    }

    #[test]
    fn bundles_round_trip_and_reject_garbage() {
        let entries: [&[u8]; 3] = [b"a", b"", b"xyz"];
        let b = encode_bundle(entries);
        assert_eq!(decode_bundle(&b, 3).expect("decodes"), entries.to_vec());
        assert!(decode_bundle(&b, 2).is_err());
        assert!(decode_bundle(&b[..b.len() - 1], 3).is_err());
    }

    #[test]
    fn tile_tree_matches_memory_tree_at_every_size() {
        let mut mem = MemoryTree::default();
        let mut tiles = TileTree::default();
        let mut full = 0;
        for i in 0u32..70_000 {
            let leaf = leaf_hash(&i.to_be_bytes());
            mem.push(leaf);
            tiles.push(leaf, |id, hashes| {
                assert!(id.is_full());
                assert_eq!(hashes.len(), 256);
                full += 1;
            });
            if i < 600 || i % 997 == 0 || i == 65_535 {
                assert_eq!(tiles.root(), mem.root(), "size {}", i + 1);
            }
        }
        // 70000/256 = 273 level-0 tiles, 273/256 = 1 level-1 tile.
        assert_eq!(full, 274);
    }
}
