//! Character-set decoding for text columns: MySQL charset name in, UTF-8
//! out, never dropping a value (unknown charsets and invalid bytes decode
//! lossily), and without allocating when the bytes are already UTF-8.

use encoding_rs::Encoding;

/// How the bytes of a character column are turned into UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// utf8mb4 / utf8mb3 / utf8; also the lossy fallback for unknown names.
    Utf8,
    /// A charset encoding_rs can decode (latin1 is windows-1252, as in MySQL).
    Encoding(&'static Encoding),
    /// UTF-32 big-endian (MySQL `utf32`), decoded by hand.
    Utf32,
    /// `binary`: not text at all.
    Binary,
}

impl Charset {
    /// Maps a MySQL/MariaDB `CHARACTER_SET_NAME` to a decoder. Unknown names
    /// fall back to (lossy) UTF-8 so a value is never dropped.
    pub fn from_mysql_name(name: &str) -> Charset {
        use encoding_rs::*;
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "utf8" | "utf8mb3" | "utf8mb4" => Charset::Utf8,
            "binary" => Charset::Binary,
            // MySQL's latin1 is cp1252; ascii is a subset of it.
            "latin1" | "ascii" => Charset::Encoding(WINDOWS_1252),
            "latin2" => Charset::Encoding(ISO_8859_2),
            "latin5" => Charset::Encoding(WINDOWS_1254),
            "latin7" => Charset::Encoding(ISO_8859_13),
            "cp1250" => Charset::Encoding(WINDOWS_1250),
            "cp1251" => Charset::Encoding(WINDOWS_1251),
            "cp1256" => Charset::Encoding(WINDOWS_1256),
            "cp1257" => Charset::Encoding(WINDOWS_1257),
            "cp866" => Charset::Encoding(IBM866),
            "koi8r" => Charset::Encoding(KOI8_R),
            "koi8u" => Charset::Encoding(KOI8_U),
            "greek" => Charset::Encoding(ISO_8859_7),
            "hebrew" => Charset::Encoding(ISO_8859_8),
            "tis620" => Charset::Encoding(WINDOWS_874),
            "macroman" => Charset::Encoding(MACINTOSH),
            "gbk" | "gb2312" => Charset::Encoding(GBK),
            "gb18030" => Charset::Encoding(GB18030),
            "big5" => Charset::Encoding(BIG5),
            "sjis" | "cp932" => Charset::Encoding(SHIFT_JIS),
            "ujis" | "eucjpms" => Charset::Encoding(EUC_JP),
            "euckr" => Charset::Encoding(EUC_KR),
            "ucs2" | "utf16" => Charset::Encoding(UTF_16BE),
            "utf16le" => Charset::Encoding(UTF_16LE),
            "utf32" => Charset::Utf32,
            _ => Charset::Utf8,
        }
    }

    /// True when ASCII bytes decode to themselves (so pure-ASCII values can
    /// be borrowed as they are).
    fn ascii_compatible(self) -> bool {
        match self {
            Charset::Utf8 | Charset::Binary => true,
            Charset::Utf32 => false,
            Charset::Encoding(e) => e.is_ascii_compatible(),
        }
    }
}

/// Decodes `bytes` (in charset `cs`) to UTF-8.
///
/// Returns `true` when `bytes` already are the valid UTF-8 result and may be
/// used as they are (nothing is appended); otherwise appends the decoded text
/// to `out` and returns `false`. Invalid sequences become U+FFFD.
pub fn decode_to_utf8(cs: Charset, bytes: &[u8], out: &mut Vec<u8>) -> bool {
    if cs.ascii_compatible() && bytes.is_ascii() {
        return true;
    }
    match cs {
        Charset::Utf8 | Charset::Binary => {
            if std::str::from_utf8(bytes).is_ok() {
                return true;
            }
            decode_with(encoding_rs::UTF_8, bytes, out);
        }
        Charset::Encoding(e) => decode_with(e, bytes, out),
        Charset::Utf32 => {
            let mut buf = [0u8; 4];
            let mut chunks = bytes.chunks_exact(4);
            for c in &mut chunks {
                let v = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                let ch = char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER);
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
            if !chunks.remainder().is_empty() {
                out.extend_from_slice(char::REPLACEMENT_CHARACTER.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    false
}

fn decode_with(enc: &'static Encoding, bytes: &[u8], out: &mut Vec<u8>) {
    let mut decoder = enc.new_decoder_without_bom_handling();
    let start = out.len();
    let need = decoder.max_utf8_buffer_length(bytes.len()).unwrap_or(bytes.len().saturating_mul(3).saturating_add(16));
    out.resize(start + need, 0);
    let (_, _, written, _) = decoder.decode_to_utf8(bytes, &mut out[start..], true);
    out.truncate(start + written);
}

/// Convenience for callers outside the hot path: decode to a `String`.
pub fn decode_string(cs: Charset, bytes: &[u8]) -> String {
    let mut out = Vec::new();
    if decode_to_utf8(cs, bytes, &mut out) {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(name: &str, bytes: &[u8]) -> String {
        decode_string(Charset::from_mysql_name(name), bytes)
    }

    #[test]
    fn charsets() {
        assert_eq!(dec("latin1", b"caf\xe9"), "café");
        // cp1252-specific: 0x80 is the euro sign in MySQL's latin1.
        assert_eq!(dec("latin1", b"\x80"), "€");
        assert_eq!(dec("cp1251", b"\xcf\xf0\xe8\xe2\xe5\xf2"), "Привет");
        assert_eq!(dec("utf8mb4", "😀 ok".as_bytes()), "😀 ok");
        assert_eq!(dec("utf8mb4", b"bad\xff"), "bad\u{fffd}");
        assert_eq!(dec("latin2", b"\xb1"), "ą");
        assert_eq!(dec("koi8r", b"\xf0\xd2\xc9"), "При");
        assert_eq!(dec("ucs2", b"\x00A\x04\x1f"), "AП");
        assert_eq!(dec("utf16le", b"A\x00\x1f\x04"), "AП");
        assert_eq!(dec("utf32", b"\x00\x01\xf6\x00\x00\x00\x00A"), "😀A");
        assert_eq!(dec("sjis", b"\x82\xa0"), "あ");
        assert_eq!(dec("gbk", b"\xc4\xe3"), "你");
        assert_eq!(dec("no-such-charset", b"x\xffy"), "x\u{fffd}y");
    }

    #[test]
    fn borrow_fast_path() {
        let mut out = Vec::new();
        assert!(decode_to_utf8(Charset::Utf8, "é".as_bytes(), &mut out));
        assert!(decode_to_utf8(Charset::from_mysql_name("latin1"), b"plain", &mut out));
        assert!(out.is_empty());
        assert!(!decode_to_utf8(Charset::from_mysql_name("utf16"), b"\x00A", &mut out));
        assert_eq!(out, b"A");
    }
}
