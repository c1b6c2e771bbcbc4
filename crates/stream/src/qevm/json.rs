//! A small JSON reader for QEMU's VM description (`QEMU_VM_VMDESCRIPTION`), `no_std` + `alloc`.
//! QEMU's `JSONWriter` (`qobject/json-writer.c`) writes objects, arrays, strings, integers and
//! booleans; this reader accepts all of JSON except non-integer numbers, limits nesting, and
//! reports errors with the byte offset in the migration file.

use alloc::string::String;
use alloc::vec::Vec;

/// A JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer (QEMU writes every number as an `int64`).
    Int(i64),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, members in file order.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Why the description is not JSON: the offset (in the file) and the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JsonError {
    pub offset: u64,
    pub reason: &'static str,
}

struct P<'a> {
    text: &'a [u8],
    pos: usize,
    base: u64,
    max_depth: u32,
}

/// Parses `text` (which starts at file offset `base`) as one JSON value with nothing but
/// whitespace after it.
pub(crate) fn parse(text: &[u8], base: u64, max_depth: u32) -> Result<Json, JsonError> {
    let mut p = P {
        text,
        pos: 0,
        base,
        max_depth,
    };
    let v = p.value(0)?;
    p.ws();
    if p.pos != text.len() {
        return Err(p.err("data after the JSON value"));
    }
    Ok(v)
}

impl P<'_> {
    fn err(&self, reason: &'static str) -> JsonError {
        JsonError {
            offset: self.base + self.pos as u64,
            reason,
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.text.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn expect(&mut self, lit: &[u8]) -> Result<(), JsonError> {
        if self.text[self.pos..].starts_with(lit) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn value(&mut self, depth: u32) -> Result<Json, JsonError> {
        if depth > self.max_depth {
            return Err(self.err("nesting too deep"));
        }
        self.ws();
        match self.peek() {
            None => Err(self.err("truncated")),
            Some(b'{') => {
                self.pos += 1;
                let mut members = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(Json::Object(members));
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return Err(self.err("expected a member name"));
                    }
                    let k = self.string()?;
                    self.ws();
                    if self.peek() != Some(b':') {
                        return Err(self.err("expected ':'"));
                    }
                    self.pos += 1;
                    let v = self.value(depth + 1)?;
                    members.push((k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(Json::Object(members));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.expect(b"true").map(|_| Json::Bool(true)),
            Some(b'f') => self.expect(b"false").map(|_| Json::Bool(false)),
            Some(b'n') => self.expect(b"null").map(|_| Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("unexpected character")),
        }
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.pos;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.pos += 1;
        }
        let digits = self.pos;
        let mut v: i64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            let d = i64::from(d - b'0');
            v = v
                .checked_mul(10)
                .and_then(|v| {
                    if neg {
                        v.checked_sub(d)
                    } else {
                        v.checked_add(d)
                    }
                })
                .ok_or_else(|| self.err("integer out of range"))?;
            self.pos += 1;
        }
        if self.pos == digits {
            self.pos = start;
            return Err(self.err("expected digits"));
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return Err(self.err("non-integer numbers are not supported"));
        }
        Ok(Json::Int(v))
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.err("bad \\u escape")),
            };
            v = v * 16 + u32::from(d);
            self.pos += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        // At the opening quote.
        self.pos += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            match c {
                b'"' => {
                    let at = self.err("string is not UTF-8");
                    self.pos += 1;
                    return String::from_utf8(out).map_err(|_| at);
                }
                b'\\' => {
                    self.pos += 1;
                    let e = self.peek().ok_or_else(|| self.err("unterminated string"))?;
                    self.pos += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi) {
                                if !self.text[self.pos..].starts_with(b"\\u") {
                                    return Err(self.err("lone surrogate"));
                                }
                                self.pos += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(self.err("lone surrogate"));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or_else(|| self.err("lone surrogate"))?
                        }
                        _ => {
                            self.pos -= 1;
                            return Err(self.err("bad escape"));
                        }
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return Err(self.err("control character in string")),
                _ => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn parses_what_qemu_writes() {
        let t = br#"{"a": [1, -2, {"b": "x\"\u00e9\ud83d\ude00"}], "t": true, "n": null}"#;
        let v = parse(t, 100, 8).unwrap();
        assert_eq!(v.get("t"), Some(&Json::Bool(true)));
        assert_eq!(v.get("n"), Some(&Json::Null));
        let a = v.get("a").unwrap().as_array().unwrap();
        assert_eq!(a[1], Json::Int(-2));
        assert_eq!(a[2].get("b").unwrap().as_str(), Some("x\"é😀"));
    }

    #[test]
    fn errors_name_the_file_offset() {
        assert_eq!(parse(b"[1, 2", 10, 8).unwrap_err().offset, 15);
        assert_eq!(parse(b"{\"a\" 1}", 10, 8).unwrap_err().offset, 15);
        assert_eq!(parse(b"1.5", 0, 8).unwrap_err().offset, 1);
        assert_eq!(parse(b"[] x", 0, 8).unwrap_err().offset, 3);
        assert!(parse(b"99999999999999999999", 0, 8).is_err());
        let deep = vec![b'['; 100];
        assert_eq!(parse(&deep, 0, 8).unwrap_err().reason, "nesting too deep");
        for cut in 0..20 {
            let t = br#"{"a":[1,"\u00e9"]}"#;
            if cut < t.len() {
                assert!(parse(&t[..cut], 0, 8).is_err());
            }
        }
    }
}
