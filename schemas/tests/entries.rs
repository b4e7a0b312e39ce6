//! Entry decoding against the golden fixtures and against malformed input.

use std::path::PathBuf;

use troop_schemas::{EntryError, Event, decode_entry, encode_entry};

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/v1");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| {
            let p = e.expect("entry").path();
            (
                p.file_stem().expect("stem").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_fixture_decodes_to_its_kind_and_re_encodes_byte_for_byte() {
    let all = fixtures();
    assert_eq!(all.len(), Event::KINDS.len());
    for (kind, bytes) in all {
        let event = decode_entry(&bytes).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(event.kind(), kind);
        assert_eq!(encode_entry(&event).expect("encodes"), bytes, "{kind}");
    }
}

#[test]
fn unknown_fields_versions_and_kinds_are_refused() {
    let (_, grant) = fixtures()
        .into_iter()
        .find(|(k, _)| k == "grant")
        .expect("grant fixture");
    let text = String::from_utf8(grant).expect("utf8");
    let extra = text.replacen("{", "{\"aaa\":1,", 1);
    assert!(
        matches!(decode_entry(extra.as_bytes()), Err(EntryError::Schema(_))),
        "unknown field"
    );
    let v2 = text.replace("\"v\":1", "\"v\":2");
    assert_eq!(
        decode_entry(v2.as_bytes()),
        Err(EntryError::UnknownVersion(2))
    );
    let no_v = text.replace(",\"v\":1", "");
    assert_eq!(
        decode_entry(no_v.as_bytes()),
        Err(EntryError::MissingVersion)
    );
    let kind = text.replace("\"kind\":\"grant\"", "\"kind\":\"mint\"");
    assert!(matches!(
        decode_entry(kind.as_bytes()),
        Err(EntryError::Schema(_))
    ));
    let spaced = text.replacen(":", ": ", 1);
    assert!(matches!(
        decode_entry(spaced.as_bytes()),
        Err(EntryError::Canonical(_))
    ));
    let float = text.replace("\"v\":1", "\"v\":1.0");
    assert!(matches!(
        decode_entry(float.as_bytes()),
        Err(EntryError::Canonical(_))
    ));
    assert!(matches!(decode_entry(b"[1]"), Err(EntryError::NotObject)));
    assert!(matches!(
        decode_entry(&vec![b' '; 70_000]),
        Err(EntryError::TooLarge { .. })
    ));
}

#[test]
fn oversized_fields_are_refused_both_ways() {
    let (_, grant) = fixtures()
        .into_iter()
        .find(|(k, _)| k == "grant")
        .expect("grant fixture");
    let mut event = decode_entry(&grant).expect("decodes");
    if let Event::Grant { memo, .. } = &mut event {
        *memo = "x".repeat(257);
    }
    assert!(matches!(
        encode_entry(&event),
        Err(EntryError::FieldTooLong { field: "memo", .. })
    ));
    let text = String::from_utf8(grant).expect("utf8");
    let start = text.find("\"memo\":\"").expect("memo") + 8;
    let end = start + text[start..].find('"').expect("end");
    let long = format!("{}{}{}", &text[..start], "x".repeat(257), &text[end..]);
    assert!(matches!(
        decode_entry(long.as_bytes()),
        Err(EntryError::FieldTooLong { .. })
    ));
}

/// The published JSON Schema accepts every golden entry and refuses the same
/// mutations the decoder refuses. Checked by a validator we did not write.
#[test]
fn json_schema_agrees_with_the_fixtures() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json/v1/entry.schema.json");
    let schema: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("schema")).expect("json");
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    for (kind, bytes) in fixtures() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{kind}: {errors:?}");
        let mut extra = v.clone();
        extra["surprise"] = serde_json::json!(1);
        assert!(!validator.is_valid(&extra), "{kind} with an unknown field");
        let mut wrong_version = v.clone();
        wrong_version["v"] = serde_json::json!(2);
        assert!(!validator.is_valid(&wrong_version), "{kind} as version 2");
        let mut fraction = v.clone();
        fraction["at_ms"] = serde_json::json!(1.5);
        assert!(
            !validator.is_valid(&fraction),
            "{kind} with a fractional time"
        );
    }
}
