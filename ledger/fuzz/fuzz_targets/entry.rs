//! Ledger entries: never panic; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = troop_schemas::decode_entry(data) {
        let again = troop_schemas::encode_entry(&event).expect("a decoded event encodes");
        assert_eq!(again, data, "decode accepted a non-canonical entry");
    }
    if let Ok(members) = troop_schemas::canonical::check_canonical(data) {
        let value: serde_json::Value = serde_json::from_slice(data).expect("canonical bytes are JSON");
        assert_eq!(troop_schemas::canonical::to_canonical_vec(&value).expect("encodes"), data);
        assert!(members.iter().all(|m| m.member.end <= data.len()));
    }
});
