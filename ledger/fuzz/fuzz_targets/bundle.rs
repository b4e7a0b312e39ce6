//! Entry bundles and hash tiles: never panic; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use troop_ledger::tile;

fuzz_target!(|data: &[u8]| {
    let Some((&width, rest)) = data.split_first() else { return };
    let want = usize::from(width) + 1;
    if let Ok(entries) = tile::decode_bundle(rest, want) {
        assert_eq!(tile::encode_bundle(entries.iter().copied()), rest);
    }
    if let Some(hashes) = tile::decode_hashes(rest, want) {
        assert_eq!(tile::encode_hashes(&hashes), rest);
    }
});
