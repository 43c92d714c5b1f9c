//! Key templates bound to a query's result columns.
//!
//! A key is `memcached.key_prefix` followed by the rendered template:
//! literal text as written (`{{` and `}}` are literal braces), and each
//! `{column}` replaced by that column's value as text: INTEGER in decimal
//! (`42`, `-7`), REAL in its shortest round-trip form (`1.5`, `1.0`,
//! `1e20`; infinities as `inf`/`-inf`), TEXT as is. A NULL or BLOB value
//! cannot be part of a key: the row is rejected.
//!
//! A rendered key must be at most [`MAX_KEY_LEN`] bytes and contain no
//! whitespace or control characters (memcached's text and meta protocols
//! cannot carry them without base64, which readers would not expect).

use std::fmt::Write as _;

use rusqlite::types::ValueRef;

use crate::config::{TemplatePart, parse_key_template};

/// memcached's key length limit.
pub const MAX_KEY_LEN: usize = 250;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(usize),
}

/// A key template whose placeholders are resolved to column indices.
#[derive(Debug, Clone)]
pub struct KeyTemplate {
    parts: Vec<Part>,
    columns: Vec<String>,
}

/// Why a row has no valid key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// A placeholder column holds NULL or a BLOB.
    Column { column: String, kind: &'static str },
    /// The rendered key is too long or contains whitespace/control chars.
    Invalid { key: String, reason: String },
}

impl KeyTemplate {
    /// Parses `template` and resolves every placeholder against `columns`;
    /// the error lists the unknown placeholders or the parse problem.
    pub fn compile(template: &str, columns: &[String]) -> Result<KeyTemplate, Vec<String>> {
        let parsed = parse_key_template(template).map_err(|e| vec![format!("key template {template:?}: {e}")])?;
        let mut parts = Vec::with_capacity(parsed.len());
        let mut problems = Vec::new();
        let mut names = Vec::new();
        for p in parsed {
            match p {
                TemplatePart::Literal(l) => parts.push(Part::Literal(l)),
                TemplatePart::Column(c) => match columns.iter().position(|x| *x == c) {
                    Some(i) => {
                        parts.push(Part::Column(i));
                        names.push(c);
                    }
                    None => problems.push(format!(
                        "key placeholder {{{c}}} is not a column of the query's result (columns: {})",
                        columns.join(", ")
                    )),
                },
            }
        }
        if problems.is_empty() { Ok(KeyTemplate { parts, columns: columns.to_vec() }) } else { Err(problems) }
    }

    /// The result columns the placeholders read, in first-use order, once each.
    pub fn placeholder_columns(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for p in &self.parts {
            if let Part::Column(i) = p {
                if !out.contains(i) {
                    out.push(*i);
                }
            }
        }
        out
    }

    /// True when the template has no placeholder (one fixed key).
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The fixed key (prefix + literal text); `None` with placeholders.
    pub fn fixed(&self, prefix: &str) -> Option<String> {
        let mut s = prefix.to_owned();
        for p in &self.parts {
            match p {
                Part::Literal(l) => s.push_str(l),
                Part::Column(_) => return None,
            }
        }
        Some(s)
    }

    /// Whether `render` (with `prefix`) could have produced `key`: the
    /// literal text in order, each placeholder standing for any run of bytes,
    /// **including an empty one** (a TEXT value `''` renders as nothing, and
    /// such a key is published like any other), and the whole key a valid
    /// rendered key (at most [`MAX_KEY_LEN`] bytes, UTF-8, no whitespace or
    /// control characters; a TEXT value that is not UTF-8 renders with
    /// U+FFFD). A fixed template matches only its own key. Adjacent
    /// placeholders match any split of their run, so only the literals
    /// matter. Allocation-free and linear in practice (each literal between
    /// the first and last placeholder is found leftmost, which is exact for
    /// wildcards that match any run); meant to run over every key an
    /// enumeration of memcached finds.
    pub fn matches(&self, prefix: &str, key: &[u8]) -> bool {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return false;
        }
        let Some(mut rest) = key.strip_prefix(prefix.as_bytes()) else {
            return false;
        };
        // Literals before the first placeholder anchor at the start, those
        // after the last one at the end.
        let mut first = 0;
        while let Some(Part::Literal(l)) = self.parts.get(first) {
            match rest.strip_prefix(l.as_bytes()) {
                Some(r) => rest = r,
                None => return false,
            }
            first += 1;
        }
        let mut end = self.parts.len();
        while end > first {
            let Part::Literal(l) = &self.parts[end - 1] else { break };
            match rest.strip_suffix(l.as_bytes()) {
                Some(r) => rest = r,
                None => return false,
            }
            end -= 1;
        }
        if first == end {
            // No placeholder: the key is exactly the literal text.
            if !rest.is_empty() {
                return false;
            }
        } else {
            // parts[first] and parts[end - 1] are placeholders: every literal
            // in between is found leftmost in what is left.
            for p in &self.parts[first..end] {
                if let Part::Literal(l) = p {
                    match find(rest, l.as_bytes()) {
                        Some(at) => rest = &rest[at + l.len()..],
                        None => return false,
                    }
                }
            }
        }
        // Only a key that render would accept.
        match std::str::from_utf8(key) {
            Ok(s) => !s.chars().any(|c| c.is_whitespace() || c.is_control()),
            Err(_) => false,
        }
    }

    /// Renders into `out` (cleared first) and validates the result.
    pub fn render<'r>(
        &self,
        prefix: &str,
        get: impl Fn(usize) -> Option<ValueRef<'r>>,
        out: &mut String,
    ) -> Result<(), KeyError> {
        out.clear();
        out.push_str(prefix);
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Column(i) => {
                    let column = || self.columns[*i].clone();
                    match get(*i) {
                        Some(ValueRef::Integer(v)) => {
                            let _ = write!(out, "{v}");
                        }
                        Some(ValueRef::Real(f)) => push_real(out, f),
                        Some(ValueRef::Text(t)) => out.push_str(&String::from_utf8_lossy(t)),
                        Some(ValueRef::Blob(_)) => {
                            return Err(KeyError::Column { column: column(), kind: "a BLOB" });
                        }
                        Some(ValueRef::Null) | None => {
                            return Err(KeyError::Column { column: column(), kind: "NULL" });
                        }
                    }
                }
            }
        }
        validate_key(out).map_err(|reason| KeyError::Invalid { key: out.clone(), reason })
    }
}

/// Where `needle` first occurs in `haystack` (keys are at most 250 bytes:
/// a plain scan beats anything cleverer).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn push_real(out: &mut String, f: f64) {
    match serde_json::Number::from_f64(f) {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None if f.is_sign_negative() => out.push_str("-inf"),
        None => out.push_str("inf"),
    }
}

/// Checks memcached's key rules: at most 250 bytes, no whitespace or
/// control characters.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("the key is {} bytes, over memcached's limit of {MAX_KEY_LEN}", key.len()));
    }
    if let Some(c) = key.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the key contains {c:?} (whitespace and control characters are not allowed)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn renders_every_value_kind_and_literal_braces() {
        let t = KeyTemplate::compile("a:{{{id}}}:{r}:{t}", &cols(&["id", "r", "t"])).unwrap();
        let vals = [ValueRef::Integer(-42), ValueRef::Real(1.0), ValueRef::Text("né".as_bytes())];
        let mut k = String::new();
        t.render("pre:", |i| vals.get(i).copied(), &mut k).unwrap();
        assert_eq!(k, "pre:a:{-42}:1.0:né");
        let vals = [ValueRef::Integer(1), ValueRef::Real(0.1), ValueRef::Text(b"x")];
        t.render("", |i| vals.get(i).copied(), &mut k).unwrap();
        assert_eq!(k, "a:{1}:0.1:x");
        assert!(!t.is_fixed());
        assert_eq!(t.fixed("p"), None);
    }

    #[test]
    fn null_blob_long_and_spaced_keys_are_rejected() {
        let t = KeyTemplate::compile("k:{id}", &cols(&["id"])).unwrap();
        let mut k = String::new();
        assert_eq!(
            t.render("", |_| Some(ValueRef::Null), &mut k),
            Err(KeyError::Column { column: "id".into(), kind: "NULL" })
        );
        assert_eq!(
            t.render("", |_| Some(ValueRef::Blob(b"x")), &mut k),
            Err(KeyError::Column { column: "id".into(), kind: "a BLOB" })
        );
        let long = "x".repeat(250);
        assert!(matches!(
            t.render("", |_| Some(ValueRef::Text(long.as_bytes())), &mut k),
            Err(KeyError::Invalid { .. })
        ));
        let ok = "x".repeat(248);
        assert!(t.render("", |_| Some(ValueRef::Text(ok.as_bytes())), &mut k).is_ok());
        assert_eq!(k.len(), 250);
        for bad in ["a b", "a\tb", "a\nb", "a\u{7f}", "a\u{a0}b"] {
            assert!(
                matches!(t.render("", |_| Some(ValueRef::Text(bad.as_bytes())), &mut k), Err(KeyError::Invalid { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn unknown_placeholders_are_listed() {
        let e = KeyTemplate::compile("k:{nope}:{id}:{also}", &cols(&["id"])).unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e[0].contains("{nope}") && e[0].contains("columns: id"), "{e:?}");
        let f = KeyTemplate::compile("fixed:{{x}}", &cols(&["id"])).unwrap();
        assert_eq!(f.fixed("p:").as_deref(), Some("p:fixed:{x}"));
    }

    fn t(template: &str) -> KeyTemplate {
        KeyTemplate::compile(template, &cols(&["x", "y", "z"])).unwrap()
    }

    /// What `render` makes of TEXT values, to check `matches` against it.
    fn rendered(t: &KeyTemplate, prefix: &str, vals: &[&[u8]]) -> String {
        let vals: Vec<ValueRef> = vals.iter().map(|v| ValueRef::Text(v)).collect();
        let mut k = String::new();
        t.render(prefix, |i| vals.get(i).copied(), &mut k).unwrap();
        k
    }

    #[test]
    fn matches_keys_the_template_renders() {
        let a = t("a:{x}:b");
        assert!(a.matches("p:", b"p:a:1:b"));
        // The literal repeats inside the value: `{x}` = `1:b:2`.
        assert!(a.matches("p:", b"p:a:1:b:2:b"));
        assert_eq!(rendered(&a, "p:", &[&b"1:b:2"[..]]), "p:a:1:b:2:b");
        assert!(!a.matches("p:", b"p:a:1:b:2"));
        assert!(!a.matches("p:", b"p:a:1:c"));
        assert!(!a.matches("p:", b"p:b:1:b"));
        // Prefix mismatch, or the key without its prefix.
        assert!(!a.matches("p:", b"q:a:1:b"));
        assert!(!a.matches("p:", b"a:1:b"));
        assert!(a.matches("", b"a:1:b"));
        assert!(!a.matches("p:", b"p:"));
        assert!(!a.matches("p:", b""));

        // Adjacent placeholders: any split, and the literals between.
        let adj = t("u{x}{y}-{z}.v");
        for k in ["u12-3.v", "u-3.v", "u1-2-3.v", "u.v-.v", "u-.v"] {
            assert!(adj.matches("", k.as_bytes()), "{k}");
        }
        for k in ["u12-3.w", "x12-3.v", "u123.v", "u.v"] {
            assert!(!adj.matches("", k.as_bytes()), "{k}");
        }
        // Placeholder first and last, literal in the middle only.
        let mid = t("{x}::{y}");
        assert!(mid.matches("", b"a::b") && mid.matches("", b"::") && mid.matches("", b"a::::b"));
        assert!(!mid.matches("", b"a:b"));
        // Head and tail literals must not overlap.
        let ov = t("ab{x}ba");
        assert!(ov.matches("", b"abba") && ov.matches("", b"ab_ba"));
        assert!(!ov.matches("", b"aba") && !ov.matches("", b"ab"));
        // Only a placeholder: anything valid under the prefix.
        let any = t("{x}");
        assert!(any.matches("p:", b"p:zzz") && any.matches("p:", b"p:"));
        assert!(!any.matches("p:", b"q:zzz"));
    }

    #[test]
    fn a_placeholder_may_be_empty_because_render_allows_it() {
        let a = t("page:{x}:v");
        let k = rendered(&a, "p_", &[&b""[..]]);
        assert_eq!(k, "p_page::v");
        assert!(a.matches("p_", k.as_bytes()));
        assert!(!a.matches("p_", b"p_page:v"));
    }

    #[test]
    fn a_fixed_template_matches_only_itself() {
        let f = t("apps:{{all}}");
        assert!(f.matches("p:", b"p:apps:{all}"));
        for k in [&b"p:apps:{all}x"[..], b"p:apps:{all", b"p:xapps:{all}", b"apps:{all}"] {
            assert!(!f.matches("p:", k), "{k:?}");
        }
        assert!(f.matches("", b"apps:{all}"));
    }

    #[test]
    fn keys_render_cannot_produce_never_match() {
        let a = t("k:{x}");
        // Not UTF-8 (render writes U+FFFD for such text).
        assert!(!a.matches("", b"k:\xff\xfe"));
        assert!(!a.matches("", b"k:\xc3"));
        let k = rendered(&a, "", &[&b"\xff"[..]]);
        assert_eq!(k, "k:\u{fffd}");
        assert!(a.matches("", k.as_bytes()));
        assert!(a.matches("", "k:né".as_bytes()));
        // Whitespace or control characters, in the value or anywhere.
        for bad in [&b"k:a b"[..], b"k:a\tb", b"k:\x7f", "k:a\u{a0}b".as_bytes(), b"k:a\r\n"] {
            assert!(!a.matches("", bad), "{bad:?}");
        }
        // Longer than memcached's limit.
        let long = format!("k:{}", "x".repeat(MAX_KEY_LEN - 2));
        assert!(a.matches("", long.as_bytes()));
        assert!(!a.matches("", format!("{long}x").as_bytes()));
    }
}
