//! Partial JSON updates (`binlog_row_value_options=PARTIAL_JSON`): MySQL logs
//! an UPDATE of a JSON column as a list of diffs against the before image
//! instead of the full new document (PARTIAL_UPDATE_ROWS_EVENT). This module
//! applies such a diff vector to the before document and prints the result
//! exactly as MySQL's `SELECT` prints the updated column.
//!
//! Wire format of one partial column value (after its length prefix), a
//! sequence of diffs until the value ends (MySQL `Json_diff::write_binary`):
//!
//! ```text
//! operation u8 (0 REPLACE, 1 INSERT, 2 REMOVE)
//! path      lenenc length + path text (`$.a[1]`, `$."a b"`)
//! value     lenenc length + binary JSON (not for REMOVE)
//! ```
//!
//! Semantics follow MySQL's `apply_json_diffs`: REPLACE needs the path to
//! exist; INSERT adds a member that must not exist yet, or inserts into an
//! array at the index (an index past the end appends); REMOVE needs the
//! member or array element to exist. Anything else, like a path that does
//! not resolve, is an error: MySQL would reject the diff as well.

use crate::replica::value::{JSON_MAX_DEPTH, JsonbContainer, json_string, json_value};

/// Why a diff vector could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonDiffError {
    /// The diff vector or a binary JSON value in it (or the before image)
    /// is malformed.
    #[error("malformed JSON diff: {0}")]
    Format(String),
    /// A path is not a simple MySQL JSON path (`$`, `.member`, `[n]`,
    /// `[last]`, `[last-n]`).
    #[error("bad JSON diff path {path:?}: {why}")]
    Path { path: String, why: &'static str },
    /// The diff does not fit the document (missing path, wrong container
    /// type, inserting an existing member, ...).
    #[error("JSON diff {op} {path:?} does not apply: {why}")]
    Rejected { op: DiffOp, path: String, why: &'static str },
}

fn format_err(what: impl std::fmt::Display) -> JsonDiffError {
    JsonDiffError::Format(what.to_string())
}

/// One diff operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffOp {
    Replace,
    Insert,
    Remove,
}

impl std::fmt::Display for DiffOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiffOp::Replace => "REPLACE",
            DiffOp::Insert => "INSERT",
            DiffOp::Remove => "REMOVE",
        })
    }
}

/// One diff as it appears on the wire, borrowing the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonDiff<'a> {
    pub op: DiffOp,
    /// The path text, e.g. `$.a[1]`.
    pub path: &'a [u8],
    /// The binary JSON value (None for REMOVE).
    pub value: Option<&'a [u8]>,
}

/// Iterates the diffs of a diff vector (the column value after its length
/// prefix). Stops at the first malformed diff, yielding the error.
pub fn parse_diffs(mut buf: &[u8]) -> impl Iterator<Item = Result<JsonDiff<'_>, JsonDiffError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let res = next_diff(&mut buf);
        if res.is_err() {
            buf = &[];
        }
        Some(res)
    })
}

fn next_diff<'a>(buf: &mut &'a [u8]) -> Result<JsonDiff<'a>, JsonDiffError> {
    let (&op, rest) = buf.split_first().ok_or_else(|| format_err("empty diff"))?;
    *buf = rest;
    let op = match op {
        0 => DiffOp::Replace,
        1 => DiffOp::Insert,
        2 => DiffOp::Remove,
        x => return Err(format_err(format_args!("unknown diff operation {x}"))),
    };
    let path = lenenc_bytes(buf, "path")?;
    let value = if op == DiffOp::Remove { None } else { Some(lenenc_bytes(buf, "value")?) };
    Ok(JsonDiff { op, path, value })
}

/// A length-encoded (`net_field_length`) byte string.
fn lenenc_bytes<'a>(buf: &mut &'a [u8], what: &str) -> Result<&'a [u8], JsonDiffError> {
    let b = *buf;
    let (&first, rest) = b.split_first().ok_or_else(|| format_err(format_args!("truncated {what} length")))?;
    let (len, rest) = match first {
        0..=250 => (u64::from(first), rest),
        252..=254 => {
            let n = match first {
                252 => 2,
                253 => 3,
                _ => 8,
            };
            let l = rest.get(..n).ok_or_else(|| format_err(format_args!("truncated {what} length")))?;
            (l.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)), &rest[n..])
        }
        _ => return Err(format_err(format_args!("bad {what} length byte {first}"))),
    };
    let len = usize::try_from(len).map_err(|_| format_err(format_args!("{what} too long")))?;
    let bytes = rest.get(..len).ok_or_else(|| format_err(format_args!("{what} of {len} bytes is truncated")))?;
    *buf = &rest[len..];
    Ok(bytes)
}

/// A JSON document as a tree. Scalars keep the text MySQL prints for them;
/// object members are kept in MySQL's order (key length, then key bytes),
/// which is the order the binary format stores and `SELECT` prints.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonNode {
    Object(Vec<(Box<[u8]>, JsonNode)>),
    Array(Vec<JsonNode>),
    /// Printed text of a scalar (`1`, `"x"`, `null`, `1.5`, `"2020-01-01"`).
    Scalar(Box<[u8]>),
}

/// MySQL's member order: shorter keys first, then bytewise.
fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

impl JsonNode {
    /// Reads binary JSON (a JSON column value); an empty value is `null`,
    /// as the decoder treats it.
    pub fn from_jsonb(jsonb: &[u8]) -> Result<JsonNode, JsonDiffError> {
        Ok(Self::from_jsonb_depth(jsonb)?.0)
    }

    /// The tree and its nesting depth (a scalar is 0).
    fn from_jsonb_depth(jsonb: &[u8]) -> Result<(JsonNode, usize), JsonDiffError> {
        match jsonb.split_first() {
            None => Ok((JsonNode::Scalar(b"null".to_vec().into()), 0)),
            Some((&t, data)) => node_from(t, data, 0).map_err(JsonDiffError::Format),
        }
    }

    /// Appends the document as MySQL prints it (`{"a": 1, "b": [1, 2]}`).
    pub fn write_text(&self, out: &mut Vec<u8>) {
        match self {
            JsonNode::Scalar(s) => out.extend_from_slice(s),
            JsonNode::Array(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    v.write_text(out);
                }
                out.push(b']');
            }
            JsonNode::Object(members) => {
                out.push(b'{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    json_string(k, out);
                    out.extend_from_slice(b": ");
                    v.write_text(out);
                }
                out.push(b'}');
            }
        }
    }

    /// The document as MySQL prints it.
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        self.write_text(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Applies one diff in place (`value` is binary JSON, None for REMOVE).
    /// On error the tree may be left unchanged or partly changed only by
    /// earlier diffs, never by this one.
    pub fn apply(&mut self, diff: &JsonDiff<'_>) -> Result<(), JsonDiffError> {
        let legs = parse_path(diff.path)?;
        let reject = |why: &'static str| JsonDiffError::Rejected {
            op: diff.op,
            path: String::from_utf8_lossy(diff.path).into_owned(),
            why,
        };
        let Some((last, parents)) = legs.split_last() else {
            return Err(reject("the path is the whole document"));
        };
        let value = match (diff.op, diff.value) {
            (DiffOp::Remove, _) => None,
            (_, None) => return Err(reject("no value")),
            (_, Some(v)) => {
                let (node, depth) = Self::from_jsonb_depth(v)?;
                if legs.len() + depth > JSON_MAX_DEPTH {
                    return Err(reject("the result would be nested too deeply"));
                }
                Some(node)
            }
        };
        let parent = seek(self, parents).ok_or_else(|| reject("the path does not exist"))?;
        match (diff.op, parent, last) {
            (DiffOp::Replace, parent, leg) => {
                let slot = seek(parent, std::slice::from_ref(leg)).ok_or_else(|| reject("the path does not exist"))?;
                if let Some(v) = value {
                    *slot = v;
                }
            }
            (DiffOp::Insert, JsonNode::Object(members), Leg::Member(name)) => {
                let mut at = members.len();
                for (i, (k, _)) in members.iter().enumerate() {
                    match key_order(k, name) {
                        std::cmp::Ordering::Less => {}
                        std::cmp::Ordering::Equal => return Err(reject("the member already exists")),
                        std::cmp::Ordering::Greater => {
                            at = i;
                            break;
                        }
                    }
                }
                if let Some(v) = value {
                    members.insert(at, (name.clone().into_boxed_slice(), v));
                }
            }
            (DiffOp::Insert, JsonNode::Array(items), &Leg::Index { index, from_end }) => {
                let (pos, _) = array_index(index, from_end, items.len());
                if let Some(v) = value {
                    items.insert(pos, v);
                }
            }
            (DiffOp::Insert, ..) => return Err(reject("the parent is not an object/array matching the path")),
            (DiffOp::Remove, JsonNode::Object(members), Leg::Member(name)) => {
                let i = members.iter().position(|(k, _)| **k == **name).ok_or_else(|| reject("no such member"))?;
                members.remove(i);
            }
            (DiffOp::Remove, JsonNode::Array(items), &Leg::Index { index, from_end }) => {
                let (pos, within) = array_index(index, from_end, items.len());
                if !within {
                    return Err(reject("array index out of bounds"));
                }
                items.remove(pos);
            }
            (DiffOp::Remove, ..) => return Err(reject("the parent is not an object/array matching the path")),
        }
        Ok(())
    }
}

fn node_from(t: u8, data: &[u8], depth: usize) -> Result<(JsonNode, usize), String> {
    if depth > JSON_MAX_DEPTH {
        return Err("JSON nested too deeply".into());
    }
    let Some(c) = JsonbContainer::new(t, data)? else {
        let mut text = Vec::new();
        json_value(t, data, depth, &mut text)?;
        return Ok((JsonNode::Scalar(text.into_boxed_slice()), 0));
    };
    let mut max_child = 0;
    let node = if c.is_object() {
        let mut members = Vec::with_capacity(c.len());
        for i in 0..c.len() {
            let (key, vt, v) = c.entry(i)?;
            let (child, d) = node_from(vt, v, depth + 1)?;
            max_child = max_child.max(d);
            members.push((key.unwrap_or_default().to_vec().into_boxed_slice(), child));
        }
        JsonNode::Object(members)
    } else {
        let mut items = Vec::with_capacity(c.len());
        for i in 0..c.len() {
            let (_, vt, v) = c.entry(i)?;
            let (child, d) = node_from(vt, v, depth + 1)?;
            max_child = max_child.max(d);
            items.push(child);
        }
        JsonNode::Array(items)
    };
    Ok((node, max_child + 1))
}

/// MySQL's `Json_array_index`: the position an index designates in an
/// array of `len` (clamped to `len`) and whether it is an existing element.
fn array_index(index: usize, from_end: bool, len: usize) -> (usize, bool) {
    let within = index < len;
    let pos = if from_end { if within { len - index - 1 } else { 0 } } else { index.min(len) };
    (pos, within)
}

/// Follows `legs` from `node`: members of objects, elements of arrays.
fn seek<'n>(mut node: &'n mut JsonNode, legs: &[Leg]) -> Option<&'n mut JsonNode> {
    for leg in legs {
        node = match (node, leg) {
            (JsonNode::Array(items), &Leg::Index { index, from_end }) => {
                let (pos, within) = array_index(index, from_end, items.len());
                if !within {
                    return None;
                }
                &mut items[pos]
            }
            (JsonNode::Object(members), Leg::Member(name)) => &mut members.iter_mut().find(|(k, _)| **k == **name)?.1,
            _ => return None,
        };
    }
    Some(node)
}

/// One step of a simple JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leg {
    Member(Vec<u8>),
    /// `[index]`, or `[last-index]` when `from_end`.
    Index {
        index: usize,
        from_end: bool,
    },
}

/// Parses a path as MySQL writes it in a diff: `$`, then `.name`,
/// `."quoted name"`, `[n]`, `[last]` or `[last-n]` legs (whitespace allowed
/// between tokens). Wildcards and ranges cannot address one value, so they
/// are errors.
fn parse_path(path: &[u8]) -> Result<Vec<Leg>, JsonDiffError> {
    let err = |why: &'static str| JsonDiffError::Path { path: String::from_utf8_lossy(path).into_owned(), why };
    let mut p = PathReader { s: path, i: 0 };
    p.ws();
    if !p.eat(b'$') {
        return Err(err("does not start with $"));
    }
    let mut legs = Vec::new();
    loop {
        p.ws();
        match p.peek() {
            None => return Ok(legs),
            Some(b'.') => {
                p.i += 1;
                p.ws();
                match p.peek() {
                    Some(b'"') => legs.push(Leg::Member(p.quoted().ok_or_else(|| err("bad quoted member name"))?)),
                    Some(b'*') => return Err(err("wildcards are not supported")),
                    _ => {
                        let start = p.i;
                        while let Some(c) = p.peek() {
                            if c == b'.' || c == b'[' || c == b'*' || c.is_ascii_whitespace() {
                                break;
                            }
                            p.i += 1;
                        }
                        if p.i == start {
                            return Err(err("empty member name"));
                        }
                        legs.push(Leg::Member(path[start..p.i].to_vec()));
                    }
                }
            }
            Some(b'[') => {
                p.i += 1;
                p.ws();
                let leg = if p.eat_word(b"last") {
                    p.ws();
                    let index = if p.eat(b'-') {
                        p.ws();
                        p.number().ok_or_else(|| err("bad array index"))?
                    } else {
                        0
                    };
                    Leg::Index { index, from_end: true }
                } else if p.peek() == Some(b'*') {
                    return Err(err("wildcards are not supported"));
                } else {
                    Leg::Index { index: p.number().ok_or_else(|| err("bad array index"))?, from_end: false }
                };
                p.ws();
                if !p.eat(b']') {
                    return Err(err("array leg not closed by ] (ranges are not supported)"));
                }
                legs.push(leg);
            }
            Some(b'*') => return Err(err("wildcards are not supported")),
            Some(_) => return Err(err("unexpected character")),
        }
    }
}

struct PathReader<'a> {
    s: &'a [u8],
    i: usize,
}

impl PathReader<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        let ok = self.peek() == Some(c);
        if ok {
            self.i += 1;
        }
        ok
    }
    fn eat_word(&mut self, w: &[u8]) -> bool {
        let ok = self.s[self.i..].starts_with(w);
        if ok {
            self.i += w.len();
        }
        ok
    }
    fn number(&mut self) -> Option<usize> {
        let start = self.i;
        let mut v: usize = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v.checked_mul(10)?.checked_add(usize::from(c - b'0'))?;
            self.i += 1;
        }
        (self.i > start).then_some(v)
    }
    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let v = u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
        self.i += 4;
        Some(v)
    }
    /// A JSON string (at `"`), unescaped to UTF-8 bytes.
    fn quoted(&mut self) -> Option<Vec<u8>> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'"' => return Some(out),
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
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
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return None;
                                }
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return None;
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(cp)?
                        }
                        _ => return None,
                    };
                    let mut b = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                c => out.push(c),
            }
        }
    }
}

/// Applies a diff vector (a partial JSON column value after its length
/// prefix) to the binary JSON `before` and appends the resulting document
/// as MySQL prints it. On error `out` is left as it was.
pub fn apply_diffs_into(before: &[u8], diffs: &[u8], out: &mut Vec<u8>) -> Result<(), JsonDiffError> {
    let mut doc = JsonNode::from_jsonb(before)?;
    for d in parse_diffs(diffs) {
        doc.apply(&d?)?;
    }
    doc.write_text(out);
    Ok(())
}

/// [`apply_diffs_into`] returning the text: the value `SELECT col` shows
/// after the update.
pub fn apply_diffs(before: &[u8], diffs: &[u8]) -> Result<String, JsonDiffError> {
    let mut out = Vec::new();
    apply_diffs_into(before, diffs, &mut out)?;
    String::from_utf8(out).map_err(|_| format_err("result is not UTF-8"))
}

/// Builds a diff vector's bytes (the inverse of [`parse_diffs`]), for tests
/// and tools that need to produce partial JSON values.
pub fn encode_diff(op: DiffOp, path: &str, value_jsonb: Option<&[u8]>, out: &mut Vec<u8>) {
    fn lenenc(n: usize, out: &mut Vec<u8>) {
        if n <= 250 {
            out.push(n as u8);
        } else if n <= 0xffff {
            out.push(252);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        } else if n <= 0xff_ffff {
            out.push(253);
            out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        } else {
            out.push(254);
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
    }
    out.push(match op {
        DiffOp::Replace => 0,
        DiffOp::Insert => 1,
        DiffOp::Remove => 2,
    });
    lenenc(path.len(), out);
    out.extend_from_slice(path.as_bytes());
    if op != DiffOp::Remove {
        let v = value_jsonb.unwrap_or(&[]);
        lenenc(v.len(), out);
        out.extend_from_slice(v);
    }
}

/// Binary JSON (small format) of a `serde_json` value, objects with keys
/// in MySQL's order: what MySQL stores for that document. For tests.
pub fn jsonb_from_serde(v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    let (t, data) = jsonb_parts(v);
    out.push(t);
    out.extend_from_slice(&data);
    out
}

fn jsonb_parts(v: &serde_json::Value) -> (u8, Vec<u8>) {
    use serde_json::Value as V;
    match v {
        V::Null => (0x04, vec![0]),
        V::Bool(true) => (0x04, vec![1]),
        V::Bool(false) => (0x04, vec![2]),
        V::Number(n) => {
            if let Some(i) = n.as_i64() {
                if let Ok(s) = i16::try_from(i) {
                    (0x05, s.to_le_bytes().to_vec())
                } else if let Ok(s) = i32::try_from(i) {
                    (0x07, s.to_le_bytes().to_vec())
                } else {
                    (0x09, i.to_le_bytes().to_vec())
                }
            } else if let Some(u) = n.as_u64() {
                (0x0a, u.to_le_bytes().to_vec())
            } else {
                (0x0b, n.as_f64().unwrap_or(0.0).to_le_bytes().to_vec())
            }
        }
        V::String(s) => {
            let mut d = Vec::new();
            let mut n = s.len();
            loop {
                let b = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    d.push(b);
                    break;
                }
                d.push(b | 0x80);
            }
            d.extend_from_slice(s.as_bytes());
            (0x0c, d)
        }
        V::Array(items) => (0x02, jsonb_container(None, items.iter().collect())),
        V::Object(map) => {
            let mut members: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            members.sort_by(|a, b| key_order(a.0.as_bytes(), b.0.as_bytes()));
            let keys = members.iter().map(|(k, _)| k.as_bytes()).collect();
            (0x00, jsonb_container(Some(keys), members.iter().map(|(_, v)| *v).collect()))
        }
    }
}

/// A small-format container (sizes must stay below 64 KiB).
fn jsonb_container(keys: Option<Vec<&[u8]>>, values: Vec<&serde_json::Value>) -> Vec<u8> {
    let n = values.len();
    let header = 4 + keys.as_ref().map_or(0, |_| 4 * n) + 3 * n;
    let mut tail = Vec::new();
    let mut key_entries = Vec::new();
    if let Some(keys) = &keys {
        for k in keys {
            key_entries.extend_from_slice(&((header + tail.len()) as u16).to_le_bytes());
            key_entries.extend_from_slice(&(k.len() as u16).to_le_bytes());
            tail.extend_from_slice(k);
        }
    }
    let mut value_entries = Vec::new();
    for v in values {
        let (t, data) = jsonb_parts(v);
        value_entries.push(t);
        if matches!(t, 0x04..=0x06) {
            let mut inline = data.clone();
            inline.resize(2, 0);
            value_entries.extend_from_slice(&inline);
        } else {
            value_entries.extend_from_slice(&((header + tail.len()) as u16).to_le_bytes());
            tail.extend_from_slice(&data);
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&((header + tail.len()) as u16).to_le_bytes());
    out.extend_from_slice(&key_entries);
    out.extend_from_slice(&value_entries);
    out.extend_from_slice(&tail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::value::format_json;

    fn jb(text: &str) -> Vec<u8> {
        jsonb_from_serde(&serde_json::from_str(text).unwrap())
    }

    fn diffs(ops: &[(DiffOp, &str, Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (op, path, v) in ops {
            encode_diff(*op, path, v.map(jb).as_deref(), &mut out);
        }
        out
    }

    fn run(before: &str, ops: &[(DiffOp, &str, Option<&str>)]) -> Result<String, JsonDiffError> {
        apply_diffs(&jb(before), &diffs(ops))
    }

    use DiffOp::{Insert as I, Remove as D, Replace as R};

    #[test]
    fn tree_prints_like_format_json() {
        for doc in [
            r#"{"a": 1, "b": [1, 2, {"c": null}], "aa": true, "ab": "x\"y", "d": 1.5, "e": -70000}"#,
            r#"[]"#,
            r#"{}"#,
            r#""s""#,
            r#"[18446744073709551615, -9223372036854775808, 0.1, false]"#,
        ] {
            let b = jb(doc);
            let mut direct = Vec::new();
            format_json(&b, &mut direct).unwrap();
            assert_eq!(JsonNode::from_jsonb(&b).unwrap().to_text(), String::from_utf8(direct).unwrap());
        }
        assert_eq!(JsonNode::from_jsonb(&[]).unwrap().to_text(), "null");
        // Keys come out in MySQL's order (length, then bytes).
        assert_eq!(
            JsonNode::from_jsonb(&jb(r#"{"bb": 1, "c": 2, "a": 3}"#)).unwrap().to_text(),
            r#"{"a": 3, "c": 2, "bb": 1}"#
        );
    }

    #[test]
    fn replace() {
        assert_eq!(run(r#"{"a": 1, "b": 2}"#, &[(R, "$.a", Some("[1, 2]"))]).unwrap(), r#"{"a": [1, 2], "b": 2}"#);
        assert_eq!(run("[1, 2, 3]", &[(R, "$[1]", Some(r#""x""#))]).unwrap(), r#"[1, "x", 3]"#);
        assert_eq!(run("[1, 2, 3]", &[(R, "$[last]", Some("9"))]).unwrap(), "[1, 2, 9]");
        assert_eq!(run("[1, 2, 3]", &[(R, "$[last-2]", Some("9"))]).unwrap(), "[9, 2, 3]");
        assert_eq!(
            run(r#"{"a": {"b": [0, {"c": 1}]}}"#, &[(R, "$.a.b[1].c", Some("1.25"))]).unwrap(),
            r#"{"a": {"b": [0, {"c": 1.25}]}}"#
        );
        assert_eq!(run(r#"{"a": 1}"#, &[(R, "$.a", Some("null"))]).unwrap(), r#"{"a": null}"#);
    }

    #[test]
    fn insert_keeps_mysql_key_order() {
        assert_eq!(
            run(r#"{"b": 1, "ccc": 2}"#, &[(I, "$.a", Some("0")), (I, "$.dd", Some("4")), (I, "$.eeee", Some("5"))])
                .unwrap(),
            r#"{"a": 0, "b": 1, "dd": 4, "ccc": 2, "eeee": 5}"#
        );
        assert_eq!(run("{}", &[(I, "$.x", Some("{}"))]).unwrap(), r#"{"x": {}}"#);
        assert_eq!(
            run(r#"{"a": {"z": 1}}"#, &[(I, "$.a.y", Some("[true]"))]).unwrap(),
            r#"{"a": {"y": [true], "z": 1}}"#
        );
    }

    #[test]
    fn insert_into_arrays() {
        assert_eq!(run("[1, 2]", &[(I, "$[0]", Some("0"))]).unwrap(), "[0, 1, 2]");
        assert_eq!(run("[1, 2]", &[(I, "$[1]", Some("9"))]).unwrap(), "[1, 9, 2]");
        // An index at or past the end appends (JSON_ARRAY_APPEND).
        assert_eq!(run("[1, 2]", &[(I, "$[2]", Some("3"))]).unwrap(), "[1, 2, 3]");
        assert_eq!(run("[1, 2]", &[(I, "$[99]", Some("3"))]).unwrap(), "[1, 2, 3]");
        assert_eq!(run("[]", &[(I, "$[0]", Some(r#"{"k": "v"}"#))]).unwrap(), r#"[{"k": "v"}]"#);
        assert_eq!(
            run(r#"{"a": [1]}"#, &[(I, "$.a[1]", Some("2")), (I, "$.a[2]", Some("3"))]).unwrap(),
            r#"{"a": [1, 2, 3]}"#
        );
    }

    #[test]
    fn remove() {
        assert_eq!(run(r#"{"a": 1, "b": 2}"#, &[(D, "$.a", None)]).unwrap(), r#"{"b": 2}"#);
        assert_eq!(run("[1, 2, 3]", &[(D, "$[1]", None)]).unwrap(), "[1, 3]");
        assert_eq!(run("[1, 2, 3]", &[(D, "$[last]", None)]).unwrap(), "[1, 2]");
        assert_eq!(run(r#"{"a": [{"b": 1, "c": 2}]}"#, &[(D, "$.a[0].b", None)]).unwrap(), r#"{"a": [{"c": 2}]}"#);
        assert_eq!(run(r#"{"a": 1}"#, &[(D, "$.a", None)]).unwrap(), "{}");
    }

    #[test]
    fn diffs_apply_in_order() {
        assert_eq!(
            run(
                r#"{"a": [1, 2], "n": 0}"#,
                &[(R, "$.n", Some("1")), (I, "$.a[2]", Some("3")), (D, "$.a[0]", None), (I, "$.m", Some(r#""x""#))]
            )
            .unwrap(),
            r#"{"a": [2, 3], "m": "x", "n": 1}"#
        );
        assert_eq!(run(r#"{"a": 1}"#, &[]).unwrap(), r#"{"a": 1}"#);
    }

    #[test]
    fn quoted_and_escaped_paths() {
        assert_eq!(run(r#"{"a b": 1}"#, &[(R, r#"$."a b""#, Some("2"))]).unwrap(), r#"{"a b": 2}"#);
        assert_eq!(run("{}", &[(I, r#"$."q\"uo\\te""#, Some("1"))]).unwrap(), r#"{"q\"uo\\te": 1}"#);
        assert_eq!(run("{}", &[(I, r#"$."\u00e9\ud83d\ude00""#, Some("1"))]).unwrap(), r#"{"é😀": 1}"#);
        assert_eq!(run(r#"{"é": [1]}"#, &[(I, "$.é[0]", Some("0"))]).unwrap(), r#"{"é": [0, 1]}"#);
        assert_eq!(run(r#"{"a": [[1]]}"#, &[(R, " $ . a [ 0 ] [ last ] ", Some("2"))]).unwrap(), r#"{"a": [[2]]}"#);
        // A quoted key that needs escaping in the output.
        assert_eq!(run("{}", &[(I, r#"$."new\nline""#, Some("1"))]).unwrap(), r#"{"new\nline": 1}"#);
    }

    #[test]
    fn rejected_diffs() {
        let rejected = |r: Result<String, JsonDiffError>| matches!(r, Err(JsonDiffError::Rejected { .. }));
        assert!(rejected(run(r#"{"a": 1}"#, &[(R, "$.b", Some("1"))])));
        assert!(rejected(run(r#"{"a": 1}"#, &[(I, "$.a", Some("1"))])), "insert of an existing member");
        assert!(rejected(run(r#"{"a": 1}"#, &[(D, "$.b", None)])));
        assert!(rejected(run("[1]", &[(D, "$[1]", None)])));
        assert!(rejected(run("[1]", &[(R, "$[1]", Some("1"))])));
        assert!(rejected(run("[1]", &[(R, "$[last-1]", Some("1"))])));
        assert!(rejected(run("[1]", &[(I, "$.a", Some("1"))])), "member leg on an array");
        assert!(rejected(run(r#"{"a": 1}"#, &[(I, "$[0]", Some("1"))])), "index leg on an object");
        assert!(rejected(run(r#"{"a": 1}"#, &[(I, "$.a.b", Some("1"))])), "into a scalar");
        assert!(rejected(run(r#"{"a": 1}"#, &[(I, "$.x.y", Some("1"))])), "missing parent");
        assert!(rejected(run(r#"{"a": 1}"#, &[(R, "$", Some("1"))])), "the root");
        // A failed diff names its operation and path.
        let e = run(r#"{"a": 1}"#, &[(R, "$.b", Some("1"))]).unwrap_err().to_string();
        assert!(e.contains("REPLACE") && e.contains("$.b"), "{e}");
    }

    #[test]
    fn bad_paths() {
        for p in
            ["", "a", "$.", "$[", "$[x]", "$[1", "$[1 to 2]", "$.*", "$[*]", "$**.a", r#"$."open"#, r#"$."\q""#, "$a"]
        {
            assert!(
                matches!(run(r#"{"a": [1]}"#, &[(R, p, Some("1"))]), Err(JsonDiffError::Path { .. })),
                "{p:?} should be a bad path"
            );
        }
    }

    #[test]
    fn malformed_vectors_never_panic() {
        let good = diffs(&[(I, "$.b", Some(r#"{"x": [1, "two"]}"#)), (D, "$.a", None)]);
        let before = jb(r#"{"a": 1}"#);
        assert_eq!(apply_diffs(&before, &good).unwrap(), r#"{"b": {"x": [1, "two"]}}"#);
        let first = good.len() - 5; // the REMOVE is 5 bytes
        assert_eq!(apply_diffs(&before, &good[..first]).unwrap(), r#"{"a": 1, "b": {"x": [1, "two"]}}"#);
        for cut in (1..good.len()).filter(|&c| c != first) {
            assert!(apply_diffs(&before, &good[..cut]).is_err(), "cut at {cut}");
        }
        // Unknown operation, bad length byte, garbage JSONB value.
        assert!(matches!(apply_diffs(&before, &[3, 3, b'$', b'.', b'a']), Err(JsonDiffError::Format(_))));
        assert!(matches!(apply_diffs(&before, &[0, 251]), Err(JsonDiffError::Format(_))));
        let mut bad_value = Vec::new();
        encode_diff(R, "$.a", Some(&[0x02, 5, 0]), &mut bad_value);
        assert!(matches!(apply_diffs(&before, &bad_value), Err(JsonDiffError::Format(_))));
        encode_diff(R, "$.a", Some(&[0x7f]), &mut bad_value);
        assert!(apply_diffs(&before, &bad_value).is_err());
        // A corrupt before document.
        assert!(matches!(apply_diffs(&[0x00, 9, 9], &good), Err(JsonDiffError::Format(_))));
        // Every byte flip errors or succeeds, but never panics.
        for i in 0..good.len() {
            let mut g = good.clone();
            g[i] ^= 0xff;
            let _ = apply_diffs(&before, &g);
        }
    }

    #[test]
    fn depth_is_bounded() {
        let mut deep = String::new();
        for _ in 0..100 {
            deep.push('[');
        }
        for _ in 0..100 {
            deep.push(']');
        }
        let v = jb(&deep);
        let mut d = Vec::new();
        encode_diff(I, "$.a", Some(&v), &mut d);
        let once = apply_diffs(&jb("{}"), &d).unwrap();
        assert!(once.starts_with(r#"{"a": [[["#));
        // Nesting a deep value under another deep value is refused, not a
        // stack overflow.
        let mut path = String::from("$.a");
        for _ in 0..99 {
            path.push_str("[0]");
        }
        encode_diff(I, &format!("{path}[0]"), Some(&v), &mut d);
        assert!(matches!(apply_diffs(&jb("{}"), &d), Err(JsonDiffError::Rejected { .. })));
    }
}
