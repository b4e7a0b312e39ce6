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
    check_canonical(bytes)?;
    serde_json::from_slice(bytes).map_err(|e| CanonicalError::Syntax(e.to_string()))
}

/// Nesting deeper than this is refused: no ledger entry needs more than 4 levels.
pub const MAX_DEPTH: usize = 16;

/// A top-level member found by [`check_canonical`]: its key, the byte range of
/// its value and the byte range of the whole `"key":value` member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    pub key: &'a str,
    pub value: std::ops::Range<usize>,
    pub member: std::ops::Range<usize>,
}

/// Checks, in one pass and without building anything, that `bytes` are exactly
/// the canonical encoding of the JSON they hold, and returns the top-level
/// object's members. Equivalent to `to_canonical_vec(parse(bytes)) == bytes`,
/// an order of magnitude faster: auditors run it on every entry of the log.
pub fn check_canonical(bytes: &[u8]) -> Result<Vec<Member<'_>>, CanonicalError> {
    let text = std::str::from_utf8(bytes).map_err(|e| CanonicalError::Syntax(e.to_string()))?;
    let mut v = Validator {
        s: text.as_bytes(),
        text,
        at: 0,
        top: Vec::new(),
    };
    v.value(0)?;
    if v.at != v.s.len() {
        return Err(CanonicalError::NotCanonical);
    }
    Ok(v.top)
}

struct Validator<'a> {
    s: &'a [u8],
    text: &'a str,
    at: usize,
    top: Vec<Member<'a>>,
}

impl<'a> Validator<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> Result<(), CanonicalError> {
        if self.peek() == Some(b) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.syntax_or_not_canonical())
        }
    }

    /// Whitespace or anything else JSON allows but canonical form does not
    /// reads as "not canonical"; the rest is a syntax error.
    fn syntax_or_not_canonical(&self) -> CanonicalError {
        if serde_json::from_slice::<serde::de::IgnoredAny>(self.s).is_ok() {
            CanonicalError::NotCanonical
        } else {
            CanonicalError::Syntax(format!("unexpected input at byte {}", self.at))
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), CanonicalError> {
        if depth > MAX_DEPTH {
            return Err(CanonicalError::Syntax(format!(
                "nested deeper than {MAX_DEPTH}"
            )));
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => {
                self.at += 1;
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(());
                }
                loop {
                    self.value(depth + 1)?;
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(());
                        }
                        _ => return Err(self.syntax_or_not_canonical()),
                    }
                }
            }
            Some(b'"') => self.string().map(|_| ()),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.syntax_or_not_canonical()),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), CanonicalError> {
        if self.s[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.syntax_or_not_canonical())
        }
    }

    fn number(&mut self) -> Result<(), CanonicalError> {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let digits_start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        let digits = &self.text[digits_start..self.at];
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(CanonicalError::Float {
                path: format!("byte {start}"),
            });
        }
        if digits.is_empty() {
            return Err(self.syntax_or_not_canonical());
        }
        if (digits.len() > 1 && digits.starts_with('0')) || (negative && digits == "0") {
            return Err(self.syntax_or_not_canonical());
        }
        match digits.parse::<u64>() {
            Ok(n) if n <= MAX_SAFE_INTEGER => Ok(()),
            _ => Err(CanonicalError::IntegerRange {
                path: format!("byte {start}"),
            }),
        }
    }

    /// Checks a string is escaped exactly as ECMAScript would; returns its raw
    /// (still escaped) contents, which for our keys is the key itself.
    fn string(&mut self) -> Result<&'a str, CanonicalError> {
        self.eat(b'"')?;
        let start = self.at;
        loop {
            let Some(b) = self.peek() else {
                return Err(CanonicalError::Syntax("unterminated string".into()));
            };
            match b {
                b'"' => {
                    let raw = &self.text[start..self.at];
                    self.at += 1;
                    return Ok(raw);
                }
                b'\\' => {
                    let esc = self.s.get(self.at + 1).copied();
                    match esc {
                        Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => self.at += 2,
                        Some(b'u') => {
                            let hex = self
                                .s
                                .get(self.at + 2..self.at + 6)
                                .ok_or(CanonicalError::NotCanonical)?;
                            let lower_hex =
                                hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
                            let code = std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok());
                            // Only control characters without a short form are written as \u00xx.
                            match code {
                                Some(c)
                                    if lower_hex
                                        && c < 0x20
                                        && !matches!(c, 0x08 | 0x09 | 0x0A | 0x0C | 0x0D) =>
                                {
                                    self.at += 6
                                }
                                _ => return Err(self.syntax_or_not_canonical()),
                            }
                        }
                        _ => return Err(self.syntax_or_not_canonical()),
                    }
                }
                0x00..=0x1F => {
                    return Err(CanonicalError::Syntax("control character in string".into()));
                }
                _ => self.at += 1,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), CanonicalError> {
        self.eat(b'{')?;
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        let mut previous: Option<&'a str> = None;
        loop {
            let member_start = self.at;
            let key = self.string()?;
            if let Some(prev) = previous
                && key_order(prev, key) != std::cmp::Ordering::Less
            {
                // Out of order, or a duplicate key.
                return Err(CanonicalError::NotCanonical);
            }
            previous = Some(key);
            self.eat(b':')?;
            let value_start = self.at;
            self.value(depth + 1)?;
            if depth == 0 {
                self.top.push(Member {
                    key,
                    value: value_start..self.at,
                    member: member_start..self.at,
                });
            }
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(self.syntax_or_not_canonical()),
            }
        }
    }
}

/// Orders two raw (escaped) keys as JCS does: by UTF-16 code units of the
/// unescaped key. Keys without escapes (all of ours) are compared directly.
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    if !a.contains('\\') && !b.contains('\\') {
        return a.encode_utf16().cmp(b.encode_utf16());
    }
    let unescape = |k: &str| -> String {
        serde_json::from_str::<String>(&format!("\"{k}\"")).unwrap_or_default()
    };
    unescape(a).encode_utf16().cmp(unescape(b).encode_utf16())
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

    proptest::proptest! {
        /// The one-pass checker agrees with "parse, re-encode, compare" on any JSON.
        #[test]
        fn checker_agrees_with_reencoding(v in arb_json()) {
            let canonical = to_canonical_vec(&v).expect("integers only");
            proptest::prop_assert!(check_canonical(&canonical).is_ok());
            let pretty = serde_json::to_vec_pretty(&v).expect("serializes");
            proptest::prop_assert_eq!(check_canonical(&pretty).is_ok(), pretty == canonical);
        }

        #[test]
        fn checker_never_accepts_what_reencoding_rejects(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if check_canonical(&bytes).is_ok() {
                let v: Value = serde_json::from_slice(&bytes).expect("accepted bytes are JSON");
                proptest::prop_assert_eq!(to_canonical_vec(&v).expect("encodes"), bytes);
            }
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-(MAX_SAFE_INTEGER as i64)..=(MAX_SAFE_INTEGER as i64)).prop_map(Value::from),
            "\\PC{0,8}|[\\x00-\\x1f\"\\\\/]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    "[a-z_\\u{e000}-\\u{e002}\\u{1f600}]{0,6}",
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
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
        let bad: [&[u8]; 11] = [
            b"-0",
            b"01",
            b"1.0",
            b"1e3",
            br#""\/""#,
            br#""\u0008""#,
            br#""\u001F""#,
            br#""\u0041""#,
            b"[1 ]",
            br#"{"a":1,"a":1}"#,
            b"true ",
        ];
        for b in bad {
            assert!(
                check_canonical(b).is_err(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        let good: [&[u8]; 6] = [
            b"0",
            b"-1",
            br#""\u001f\b""#,
            b"[]",
            b"{}",
            br#"[{"a":[]}]"#,
        ];
        for g in good {
            assert!(
                check_canonical(g).is_ok(),
                "{:?}",
                String::from_utf8_lossy(g)
            );
        }
    }
}
