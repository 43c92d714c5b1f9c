//! Value encoding: a small infallible msgpack writer, JSON columns as
//! nested msgpack, the msgpack → JSON transcoder of the `json` codec, the
//! msgpack → pickle transcoder of the `pickle` codec, and the entry hash.
//!
//! The encoding contract itself is documented on [`crate::views`].

use rusqlite::types::ValueRef;
use xxhash_rust::xxh3::Xxh3;

use crate::config::Codec;

/// Appends msgpack to a `Vec<u8>`; every function picks the smallest
/// representation, as msgpack-python and rmp do.
pub mod mp {
    pub fn nil(out: &mut Vec<u8>) {
        out.push(0xc0);
    }

    pub fn bool(out: &mut Vec<u8>, v: bool) {
        out.push(if v { 0xc3 } else { 0xc2 });
    }

    pub fn uint(out: &mut Vec<u8>, v: u64) {
        if v < 0x80 {
            out.push(v as u8);
        } else if v <= u8::MAX as u64 {
            out.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= u16::MAX as u64 {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= u32::MAX as u64 {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn int(out: &mut Vec<u8>, v: i64) {
        if v >= 0 {
            uint(out, v as u64);
        } else if v >= -32 {
            out.push(v as i8 as u8);
        } else if v >= i8::MIN as i64 {
            out.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i16::MIN as i64 {
            out.push(0xd1);
            out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i32::MIN as i64 {
            out.push(0xd2);
            out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            out.push(0xd3);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }

    pub fn f64(out: &mut Vec<u8>, v: f64) {
        out.push(0xcb);
        out.extend_from_slice(&v.to_be_bytes());
    }

    fn len_header(out: &mut Vec<u8>, len: usize, fix: Option<(u8, usize)>, m8: Option<u8>, m16: u8, m32: u8) {
        match (fix, m8) {
            (Some((base, max)), _) if len < max => out.push(base | len as u8),
            (_, Some(m)) if len <= u8::MAX as usize => out.extend_from_slice(&[m, len as u8]),
            _ if len <= u16::MAX as usize => {
                out.push(m16);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                // SQLite caps strings and blobs at 1 GB, so u32 never truncates.
                out.push(m32);
                out.extend_from_slice(&(len as u32).to_be_bytes());
            }
        }
    }

    pub fn str(out: &mut Vec<u8>, s: &str) {
        len_header(out, s.len(), Some((0xa0, 32)), Some(0xd9), 0xda, 0xdb);
        out.extend_from_slice(s.as_bytes());
    }

    pub fn bin(out: &mut Vec<u8>, b: &[u8]) {
        len_header(out, b.len(), None, Some(0xc4), 0xc5, 0xc6);
        out.extend_from_slice(b);
    }

    pub fn array_len(out: &mut Vec<u8>, len: usize) {
        len_header(out, len, Some((0x90, 16)), None, 0xdc, 0xdd);
    }

    pub fn map_len(out: &mut Vec<u8>, len: usize) {
        len_header(out, len, Some((0x80, 16)), None, 0xde, 0xdf);
    }
}

/// Why a column value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueError {
    /// A `json_columns` value that is not valid JSON text.
    InvalidJson(String),
}

/// Appends a SQLite value as msgpack: INTEGER → int, REAL → float64, TEXT
/// → str (invalid UTF-8 replaced by U+FFFD), BLOB → bin, NULL → nil.
pub fn sqlite_value(out: &mut Vec<u8>, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => mp::nil(out),
        ValueRef::Integer(i) => mp::int(out, i),
        ValueRef::Real(f) => mp::f64(out, f),
        ValueRef::Text(t) => mp::str(out, &String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => mp::bin(out, b),
    }
}

/// Appends a `json_columns` value: TEXT is parsed as JSON and written as
/// nested msgpack; NULL → nil; INTEGER/REAL (e.g. from `json_extract`) are
/// their number; BLOB is an error.
pub fn json_value(out: &mut Vec<u8>, v: ValueRef<'_>) -> Result<(), ValueError> {
    match v {
        ValueRef::Null => mp::nil(out),
        ValueRef::Integer(i) => mp::int(out, i),
        ValueRef::Real(f) => mp::f64(out, f),
        ValueRef::Text(t) => {
            let parsed: serde_json::Value =
                serde_json::from_slice(t).map_err(|e| ValueError::InvalidJson(e.to_string()))?;
            json(out, &parsed);
        }
        ValueRef::Blob(_) => {
            return Err(ValueError::InvalidJson("a BLOB, not JSON text (use json() to turn JSONB into text)".into()));
        }
    }
    Ok(())
}

/// JSON → msgpack: object → map in document order, array → array,
/// true/false → bool, integers (fitting i64/u64) → int, other numbers →
/// float64, null → nil.
pub fn json(out: &mut Vec<u8>, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => mp::nil(out),
        Value::Bool(b) => mp::bool(out, *b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                mp::int(out, i)
            } else if let Some(u) = n.as_u64() {
                mp::uint(out, u)
            } else {
                mp::f64(out, n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => mp::str(out, s),
        Value::Array(a) => {
            mp::array_len(out, a.len());
            for x in a {
                json(out, x);
            }
        }
        Value::Object(o) => {
            mp::map_len(out, o.len());
            for (k, x) in o {
                mp::str(out, k);
                json(out, x);
            }
        }
    }
}

/// Standard base64 with padding (RFC 4648 §4), the `json` codec's BLOB form.
pub fn base64(out: &mut Vec<u8>, input: &[u8]) {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for c in input.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        out.push(A[(n >> 18) as usize & 63]);
        out.push(A[(n >> 12) as usize & 63]);
        out.push(if c.len() > 1 { A[(n >> 6) as usize & 63] } else { b'=' });
        out.push(if c.len() > 2 { A[n as usize & 63] } else { b'=' });
    }
}

/// Transcodes msgpack written by this module into JSON: map → object (a
/// non-string key becomes its JSON text inside a string: `1` → `"1"`,
/// `null` → `"null"`), array → array, str → string, bin → base64 string,
/// int → number, float64 → number (non-finite → `null`), bool, nil → null.
pub fn msgpack_to_json(input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut r = Reader { b: input, pos: 0 };
    r.value(out, false)?;
    if r.pos != input.len() {
        return Err("trailing bytes after the msgpack value".into());
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("truncated msgpack")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| acc << 8 | *b as u64))
    }

    fn value(&mut self, out: &mut Vec<u8>, as_key: bool) -> Result<(), String> {
        let m = self.u8()?;
        // Non-string map keys are written as strings.
        let quoted = as_key && !matches!(m, 0xa0..=0xbf | 0xd9..=0xdb | 0xc4..=0xc6);
        if quoted {
            out.push(b'"');
        }
        match m {
            0x00..=0x7f => num(out, m as u64),
            0xe0..=0xff => num(out, m as i8 as i64),
            0xcc => num(out, self.be(1)?),
            0xcd => num(out, self.be(2)?),
            0xce => num(out, self.be(4)?),
            0xcf => num(out, self.be(8)?),
            0xd0 => num(out, self.be(1)? as u8 as i8 as i64),
            0xd1 => num(out, self.be(2)? as u16 as i16 as i64),
            0xd2 => num(out, self.be(4)? as u32 as i32 as i64),
            0xd3 => num(out, self.be(8)? as i64),
            0xca => float(out, f32::from_bits(self.be(4)? as u32) as f64)?,
            0xcb => float(out, f64::from_bits(self.be(8)?))?,
            0xc0 => out.extend_from_slice(b"null"),
            0xc2 => out.extend_from_slice(b"false"),
            0xc3 => out.extend_from_slice(b"true"),
            0xa0..=0xbf => self.str(out, (m & 0x1f) as usize)?,
            0xd9 => {
                let n = self.be(1)? as usize;
                self.str(out, n)?
            }
            0xda => {
                let n = self.be(2)? as usize;
                self.str(out, n)?
            }
            0xdb => {
                let n = self.be(4)? as usize;
                self.str(out, n)?
            }
            0xc4..=0xc6 => {
                let n = self.be(1 << (m - 0xc4))? as usize;
                out.push(b'"');
                base64(out, self.take(n)?);
                out.push(b'"');
            }
            0x90..=0x9f => self.array(out, (m & 0x0f) as usize)?,
            0xdc => {
                let n = self.be(2)? as usize;
                self.array(out, n)?
            }
            0xdd => {
                let n = self.be(4)? as usize;
                self.array(out, n)?
            }
            0x80..=0x8f => self.map(out, (m & 0x0f) as usize)?,
            0xde => {
                let n = self.be(2)? as usize;
                self.map(out, n)?
            }
            0xdf => {
                let n = self.be(4)? as usize;
                self.map(out, n)?
            }
            other => return Err(format!("unsupported msgpack marker 0x{other:02x}")),
        }
        if quoted {
            out.push(b'"');
        }
        Ok(())
    }

    fn str(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), String> {
        let s = self.take(n)?;
        let s = String::from_utf8_lossy(s);
        serde_json::to_writer(&mut *out, s.as_ref()).map_err(|e| e.to_string())
    }

    fn array(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), String> {
        out.push(b'[');
        for i in 0..n {
            if i > 0 {
                out.push(b',');
            }
            self.value(out, false)?;
        }
        out.push(b']');
        Ok(())
    }

    fn map(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), String> {
        out.push(b'{');
        for i in 0..n {
            if i > 0 {
                out.push(b',');
            }
            self.value(out, true)?;
            out.push(b':');
            self.value(out, false)?;
        }
        out.push(b'}');
        Ok(())
    }
}

fn num(out: &mut Vec<u8>, v: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{v}"); // writing to a Vec cannot fail
}

fn float(out: &mut Vec<u8>, f: f64) -> Result<(), String> {
    // serde_json writes the shortest round-trip form (ryu) and `null`
    // for NaN and infinities.
    serde_json::to_writer(&mut *out, &f).map_err(|e| e.to_string())
}

/// Transcodes msgpack written by this module into a Python pickle
/// (protocol 3, loaded by every CPython 3): map → dict (entries in order),
/// array → list, str → str, bin → bytes, int → int, float → float, bool →
/// bool, nil → None. Written by serde-pickle with plain-data opcodes only:
/// no GLOBAL, no REDUCE, nothing that imports or calls anything when
/// loaded.
pub fn msgpack_to_pickle(input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut r = input;
    let v = rmpv::decode::read_value_ref(&mut r).map_err(|e| e.to_string())?;
    if !r.is_empty() {
        return Err("trailing bytes after the msgpack value".into());
    }
    serde_pickle::to_writer(out, &Pickled(&v), serde_pickle::SerOptions::new()).map_err(|e| e.to_string())
}

/// A msgpack value, serialized through serde into plain data.
struct Pickled<'a, 'b>(&'b rmpv::ValueRef<'a>);

impl serde::Serialize for Pickled<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use rmpv::ValueRef as V;
        use serde::ser::{Error as _, SerializeMap, SerializeSeq};
        match self.0 {
            V::Nil => s.serialize_none(),
            V::Boolean(b) => s.serialize_bool(*b),
            V::Integer(i) => match (i.as_i64(), i.as_u64()) {
                (Some(v), _) => s.serialize_i64(v),
                (None, Some(u)) => s.serialize_u64(u),
                _ => Err(S::Error::custom("msgpack integer out of range")),
            },
            V::F32(f) => s.serialize_f64(f64::from(*f)),
            V::F64(f) => s.serialize_f64(*f),
            V::String(t) => match t.as_str() {
                Some(t) => s.serialize_str(t),
                None => s.serialize_str(&String::from_utf8_lossy(t.as_bytes())),
            },
            V::Binary(b) => s.serialize_bytes(b),
            V::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for x in a {
                    seq.serialize_element(&Pickled(x))?;
                }
                seq.end()
            }
            V::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(&Pickled(k), &Pickled(v))?;
                }
                map.end()
            }
            V::Ext(..) => Err(S::Error::custom("msgpack extension types have no plain pickle form")),
        }
    }
}

/// The xxh3-128 of an entry's payload, salted with the codec and exptime
/// so that changing either rewrites every entry.
pub fn entry_hash(codec: Codec, exptime: u32, payload: &[u8]) -> [u8; 16] {
    let mut h = Xxh3::new();
    h.update(&[match codec {
        Codec::Msgpack => 1,
        Codec::Dogpile => 2,
        // 5, not 3: json values moved from flags 0 to 2, so entries
        // published with 0 are rewritten at the first publish.
        Codec::Json => 5,
        Codec::Pickle => 4,
    }]);
    h.update(&exptime.to_le_bytes());
    h.update(payload);
    h.digest128().to_be_bytes()
}

/// Appends dogpile's `CachedValue` metadata (the second element of the
/// `[payload, metadata]` array): `{"ct": <unix time float>, "v": 2}`.
pub fn dogpile_metadata(out: &mut Vec<u8>, created: f64) {
    mp::map_len(out, 2);
    mp::str(out, "ct");
    mp::f64(out, created);
    mp::str(out, "v");
    mp::int(out, 2);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(b: &[u8]) -> rmpv::Value {
        let mut r = b;
        let v = rmpv::decode::read_value(&mut r).unwrap();
        assert!(r.is_empty(), "trailing bytes");
        v
    }

    #[test]
    fn ints_round_trip_through_rmpv_at_every_boundary() {
        for v in [
            0i64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as i64,
            u32::MAX as i64 + 1,
            i64::MAX,
            -1,
            -32,
            -33,
            -128,
            -129,
            -32768,
            -32769,
            i32::MIN as i64,
            i32::MIN as i64 - 1,
            i64::MIN,
        ] {
            let mut out = Vec::new();
            mp::int(&mut out, v);
            assert_eq!(decode(&out).as_i64(), Some(v), "{v}");
            // and matches rmp's choice of representation
            let mut expect = Vec::new();
            rmp::encode::write_sint(&mut expect, v).unwrap();
            assert_eq!(out, expect, "{v}");
        }
        let mut out = Vec::new();
        mp::uint(&mut out, u64::MAX);
        assert_eq!(decode(&out).as_u64(), Some(u64::MAX));
    }

    #[test]
    fn lengths_round_trip_at_every_boundary() {
        for n in [0usize, 15, 16, 31, 32, 255, 256, 65535, 65536] {
            let s = "x".repeat(n);
            let mut out = Vec::new();
            mp::str(&mut out, &s);
            assert_eq!(decode(&out).as_str(), Some(s.as_str()));
            let mut out = Vec::new();
            mp::bin(&mut out, s.as_bytes());
            assert_eq!(decode(&out).as_slice(), Some(s.as_bytes()));
            let mut out = Vec::new();
            mp::array_len(&mut out, n);
            for _ in 0..n {
                mp::nil(&mut out);
            }
            assert_eq!(decode(&out).as_array().map(|a| a.len()), Some(n));
            let mut out = Vec::new();
            mp::map_len(&mut out, n);
            for i in 0..n {
                mp::int(&mut out, i as i64);
                mp::bool(&mut out, true);
            }
            assert_eq!(decode(&out).as_map().map(|a| a.len()), Some(n));
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            base64(&mut out, i.as_bytes());
            assert_eq!(out, o.as_bytes());
        }
    }

    #[test]
    fn transcoder_handles_every_kind() {
        let mut m = Vec::new();
        mp::map_len(&mut m, 8);
        mp::str(&mut m, "i");
        mp::int(&mut m, -70000);
        mp::str(&mut m, "u");
        mp::uint(&mut m, u64::MAX);
        mp::str(&mut m, "f");
        mp::f64(&mut m, 1.5);
        mp::str(&mut m, "s");
        mp::str(&mut m, "é\"\n");
        mp::str(&mut m, "b");
        mp::bin(&mut m, &[0, 255]);
        mp::int(&mut m, 7);
        mp::array_len(&mut m, 3);
        mp::nil(&mut m);
        mp::bool(&mut m, true);
        mp::bool(&mut m, false);
        mp::str(&mut m, "inf");
        mp::f64(&mut m, f64::INFINITY);
        mp::nil(&mut m);
        mp::map_len(&mut m, 0);
        let mut j = Vec::new();
        msgpack_to_json(&m, &mut j).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"i": -70000, "u": u64::MAX, "f": 1.5, "s": "é\"\n", "b": "AP8=", "7": [null, true, false], "inf": null, "null": {}})
        );
        assert!(msgpack_to_json(&m[..m.len() - 1], &mut Vec::new()).is_err());
    }

    /// The pickle opcodes a plain-data pickle may use (protocol ≤ 3): no
    /// GLOBAL/STACK_GLOBAL, REDUCE, BUILD, INST, OBJ, NEWOBJ, EXT*,
    /// PERSID.
    fn assert_plain_pickle(p: &[u8]) {
        assert_eq!(&p[..2], b"\x80\x03", "protocol 3 header");
        let mut i = 2;
        while i < p.len() {
            let op = p[i];
            i += 1;
            let skip = |n: usize| n;
            let le = |b: &[u8]| b.iter().rev().fold(0usize, |a, x| a << 8 | *x as usize);
            i += match op {
                b'.' => {
                    assert_eq!(i, p.len(), "STOP is last");
                    break;
                }
                b'N' | 0x88 | 0x89 | b'}' | b']' | b'(' | b'u' | b'e' | b's' | b'a' | b')' | b't' | 0x85 | 0x86
                | 0x87 | b'0' => skip(0),
                b'J' => skip(4),
                b'K' => skip(1),
                b'M' => skip(2),
                b'G' => skip(8),
                0x8a => 1 + p[i] as usize,
                b'X' | b'B' => 4 + le(&p[i..i + 4]),
                b'C' => 1 + p[i] as usize,
                b'q' => skip(1),
                b'r' => skip(4),
                other => panic!("opcode 0x{other:02x} ({:?}) is not plain data", other as char),
            };
        }
    }

    #[test]
    fn pickles_are_plain_data_and_round_trip() {
        let mut m = Vec::new();
        mp::map_len(&mut m, 9);
        mp::str(&mut m, "i");
        mp::int(&mut m, -70000);
        mp::str(&mut m, "big");
        mp::int(&mut m, i64::MIN);
        mp::str(&mut m, "u");
        mp::uint(&mut m, u64::MAX);
        mp::str(&mut m, "f");
        mp::f64(&mut m, 1.5);
        mp::str(&mut m, "s");
        mp::str(&mut m, "é\"\n");
        mp::str(&mut m, "b");
        mp::bin(&mut m, &[0, 255]);
        mp::int(&mut m, 7);
        mp::array_len(&mut m, 3);
        mp::nil(&mut m);
        mp::bool(&mut m, true);
        mp::bool(&mut m, false);
        mp::str(&mut m, "long");
        mp::bin(&mut m, &[7; 300]);
        mp::str(&mut m, "empty");
        mp::map_len(&mut m, 0);
        let mut p = Vec::new();
        msgpack_to_pickle(&m, &mut p).unwrap();
        assert_plain_pickle(&p);
        use serde_pickle::{HashableValue as H, Value as P};
        let v = serde_pickle::value_from_slice(&p, Default::default()).unwrap();
        let P::Dict(d) = v else { panic!("{v:?}") };
        assert_eq!(d.len(), 9);
        assert_eq!(d[&H::String("i".into())], P::I64(-70000));
        assert_eq!(d[&H::String("big".into())], P::I64(i64::MIN));
        assert_eq!(d[&H::String("f".into())], P::F64(1.5));
        assert_eq!(d[&H::String("s".into())], P::String("é\"\n".into()));
        assert_eq!(d[&H::String("b".into())], P::Bytes(vec![0, 255]));
        assert_eq!(d[&H::I64(7)], P::List(vec![P::None, P::Bool(true), P::Bool(false)]));
        assert_eq!(d[&H::String("long".into())], P::Bytes(vec![7; 300]));
        assert_eq!(d[&H::String("empty".into())], P::Dict(Default::default()));
        assert!(matches!(&d[&H::String("u".into())], P::Int(_)), "u64::MAX is a Python int");
        // map order is kept: keys appear in the stream as in the msgpack.
        let pos = |needle: &[u8]| p.windows(needle.len()).position(|w| w == needle).unwrap();
        assert!(pos(b"big") < pos(b"empty"));
        assert!(msgpack_to_pickle(&m[..m.len() - 1], &mut Vec::new()).is_err());
    }

    #[test]
    fn hash_depends_on_codec_exptime_and_payload() {
        let a = entry_hash(Codec::Msgpack, 0, b"x");
        assert_eq!(a, entry_hash(Codec::Msgpack, 0, b"x"));
        assert_ne!(a, entry_hash(Codec::Dogpile, 0, b"x"));
        assert_ne!(a, entry_hash(Codec::Msgpack, 1, b"x"));
        assert_ne!(a, entry_hash(Codec::Msgpack, 0, b"y"));
    }
}
