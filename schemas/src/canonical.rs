//! RFC 8785 (JCS) canonical JSON, restricted to what ledger entries may hold:
//! objects, arrays, strings, booleans, null and integers in the I-JSON safe range.
//!
//! Floats are refused outright: money is integers, and a float's canonical form
//! would depend on ECMAScript number formatting that we do not want to carry.

use serde_json::Value;

/// Largest integer that survives a round trip through an IEEE-754 double
/// (I-JSON, RFC 7493 §2.2). Canonical JSON consumers in other languages parse
/// numbers as doubles, so anything larger would be silently corrupted.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CanonicalError {
    #[error("not valid JSON: {0}")]
    Syntax(String),
    #[error("floating-point number at {path}: only integers are allowed")]
    Float { path: String },
    #[error("integer at {path} is outside ±2^53-1")]
    IntegerRange { path: String },
    #[error("bytes are valid JSON but not in RFC 8785 canonical form")]
    NotCanonical,
}

/// Serializes `value` in canonical form.
pub fn to_canonical_vec(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out, &mut String::from("$"))?;
    Ok(out)
}

/// Parses `bytes` and checks they are exactly the canonical encoding of what they hold.
pub fn parse_canonical(bytes: &[u8]) -> Result<Value, CanonicalError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| CanonicalError::Syntax(e.to_string()))?;
    let again = to_canonical_vec(&value)?;
    if again != bytes {
        return Err(CanonicalError::NotCanonical);
    }
    Ok(value)
}

fn write_value(value: &Value, out: &mut Vec<u8>, path: &mut String) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                if u > MAX_SAFE_INTEGER {
                    return Err(CanonicalError::IntegerRange { path: path.clone() });
                }
                out.extend_from_slice(u.to_string().as_bytes());
            } else if let Some(i) = n.as_i64() {
                if i.unsigned_abs() > MAX_SAFE_INTEGER {
                    return Err(CanonicalError::IntegerRange { path: path.clone() });
                }
                out.extend_from_slice(i.to_string().as_bytes());
            } else {
                return Err(CanonicalError::Float { path: path.clone() });
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                write_value(item, out, path)?;
                path.truncate(len);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // JCS orders keys by their UTF-16 code units, which differs from
            // UTF-8 byte order only above the BMP; do it the specified way.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                let len = path.len();
                path.push('.');
                path.push_str(key);
                write_value(&map[key], out, path)?;
                path.truncate(len);
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// ECMAScript `JSON.stringify` string escaping, which JCS adopts.
fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{08}' => out.extend_from_slice(b"\\b"),
            '\u{09}' => out.extend_from_slice(b"\\t"),
            '\u{0A}' => out.extend_from_slice(b"\\n"),
            '\u{0C}' => out.extend_from_slice(b"\\f"),
            '\u{0D}' => out.extend_from_slice(b"\\r"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_strips_whitespace() {
        let v: Value =
            serde_json::from_str(r#"{ "b": 1, "a": [true, null, "x"], "c": {"z": -3, "y": 0} }"#)
                .expect("valid json");
        let bytes = to_canonical_vec(&v).expect("canonical");
        assert_eq!(bytes, br#"{"a":[true,null,"x"],"b":1,"c":{"y":0,"z":-3}}"#);
        assert_eq!(parse_canonical(&bytes).expect("round trip"), v);
    }

    #[test]
    fn escapes_like_ecmascript() {
        let v = json!({"s": "q\"b\\\u{1}\n\u{7f}é/€😀"});
        let bytes = to_canonical_vec(&v).expect("canonical");
        assert_eq!(
            String::from_utf8(bytes).expect("utf8"),
            "{\"s\":\"q\\\"b\\\\\\u0001\\n\u{7f}é/€😀\"}"
        );
    }

    #[test]
    fn orders_keys_by_utf16_code_units() {
        // U+FF61 sorts before U+1F600 in UTF-8 byte order but after it in UTF-16.
        let v = json!({"\u{1F600}": 1, "\u{FF61}": 2});
        let bytes = to_canonical_vec(&v).expect("canonical");
        assert_eq!(
            String::from_utf8(bytes).expect("utf8"),
            "{\"😀\":1,\"｡\":2}"
        );
    }

    #[test]
    fn refuses_floats_and_unsafe_integers() {
        assert!(matches!(
            to_canonical_vec(&json!({"a": 1.5})),
            Err(CanonicalError::Float { .. })
        ));
        assert!(matches!(
            to_canonical_vec(&json!([MAX_SAFE_INTEGER + 1])),
            Err(CanonicalError::IntegerRange { .. })
        ));
        assert!(to_canonical_vec(&json!([MAX_SAFE_INTEGER])).is_ok());
    }

    #[test]
    fn rejects_non_canonical_bytes() {
        assert_eq!(
            parse_canonical(b"{\"a\": 1}"),
            Err(CanonicalError::NotCanonical)
        );
        assert_eq!(
            parse_canonical(b"{\"b\":1,\"a\":2}"),
            Err(CanonicalError::NotCanonical)
        );
        assert_eq!(
            parse_canonical(b"{\"a\":\"\\u0041\"}"),
            Err(CanonicalError::NotCanonical)
        );
        assert!(matches!(
            parse_canonical(b"{"),
            Err(CanonicalError::Syntax(_))
        ));
    }
}
