//! The stored rows of a patchable `map` or `list` view: each row's encoded
//! piece (for a map: the encoded map key followed by the encoded value; for
//! a list: the encoded row), kept in the query's `ORDER BY` order, so that
//! a transaction that changes k rows re-queries and re-encodes those k rows
//! only and the entry is a concatenation of the stored pieces.
//!
//! Rows are ordered as SQLite orders the result values (BINARY collation):
//! NULL first, then numbers (INTEGER and REAL compared by value), then TEXT
//! (bytewise), then BLOB (bytewise); `DESC` reverses a term. Every full
//! computation checks that the rows SQLite returned are strictly increasing
//! under this order and that no row identity (see
//! [`super::incremental::analyze_ordered`]) repeats; when they are not (a
//! tie, a duplicate map key), no state is kept and the view is recomputed
//! in full until a full computation succeeds again.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use rusqlite::types::ValueRef;

/// One result value, ordered as SQLite's `ORDER BY` orders it.
#[derive(Debug, Clone)]
pub enum SortVal {
    Null,
    Int(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl SortVal {
    pub fn from_ref(v: ValueRef<'_>) -> SortVal {
        match v {
            ValueRef::Null => SortVal::Null,
            ValueRef::Integer(i) => SortVal::Int(i),
            ValueRef::Real(f) => SortVal::Real(f),
            ValueRef::Text(t) => SortVal::Text(t.to_vec()),
            ValueRef::Blob(b) => SortVal::Blob(b.to_vec()),
        }
    }

    fn class(&self) -> u8 {
        match self {
            SortVal::Null => 0,
            SortVal::Int(_) | SortVal::Real(_) => 1,
            SortVal::Text(_) => 2,
            SortVal::Blob(_) => 3,
        }
    }

    /// SQLite's comparison of two values under BINARY collation.
    pub fn cmp_sqlite(&self, other: &SortVal) -> Ordering {
        use SortVal::*;
        match (self, other) {
            (Int(a), Int(b)) => a.cmp(b),
            (Real(a), Real(b)) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
            (Int(a), Real(b)) => int_real(*a, *b),
            (Real(a), Int(b)) => int_real(*b, *a).reverse(),
            (Text(a), Text(b)) | (Blob(a), Blob(b)) => a.cmp(b),
            _ => self.class().cmp(&other.class()),
        }
    }
}

/// An INTEGER against a REAL, exactly (as `sqlite3IntFloatCompare`).
fn int_real(i: i64, r: f64) -> Ordering {
    if r.is_nan() {
        // SQLite stores no NaN (it becomes NULL); order it like SQLite's
        // comparison does, as smaller than any integer.
        return Ordering::Greater;
    }
    // ±2^63, exactly representable: outside that, r is beyond any i64.
    let min = i64::MIN as f64;
    if r < min {
        return Ordering::Greater;
    }
    if r >= -min {
        return Ordering::Less;
    }
    let t = r.trunc();
    let ti = t as i64;
    match i.cmp(&ti) {
        Ordering::Equal => 0.0f64.partial_cmp(&(r - t)).unwrap_or(Ordering::Equal),
        o => o,
    }
}

/// A row's position: its `ORDER BY` values with each term's direction.
#[derive(Debug, Clone)]
pub struct SortKey {
    pub vals: Vec<SortVal>,
    pub desc: std::sync::Arc<[bool]>,
}

impl PartialEq for SortKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for SortKey {}
impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for SortKey {
    fn cmp(&self, other: &Self) -> Ordering {
        for (n, (a, b)) in self.vals.iter().zip(&other.vals).enumerate() {
            let o = a.cmp_sqlite(b);
            let o = if self.desc.get(n).copied().unwrap_or(false) { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        self.vals.len().cmp(&other.vals.len())
    }
}

/// The stored rows of one view.
#[derive(Debug, Default)]
pub struct Rows {
    /// Which compiled view set the rows belong to (see `ViewSet`'s
    /// generation): rows of an earlier compilation are never patched.
    pub generation: u64,
    /// Position → (identity, encoded piece).
    by_order: BTreeMap<SortKey, (Vec<u8>, Vec<u8>)>,
    /// Identity (its values encoded as msgpack) → position.
    by_identity: HashMap<Vec<u8>, SortKey>,
}

impl Rows {
    pub fn new(generation: u64) -> Rows {
        Rows { generation, ..Default::default() }
    }

    pub fn len(&self) -> usize {
        self.by_order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    /// Appends a row of a full computation, in query order: false when it
    /// does not come strictly after the last row, or its identity repeats
    /// (then the rows cannot be patched).
    pub fn push_in_order(&mut self, key: SortKey, identity: Vec<u8>, piece: Vec<u8>) -> bool {
        if self.by_order.last_key_value().is_some_and(|(last, _)| *last >= key) {
            return false;
        }
        self.insert(key, identity, piece)
    }

    /// Removes the row of `identity`, if any.
    pub fn remove(&mut self, identity: &[u8]) {
        if let Some(k) = self.by_identity.remove(identity) {
            self.by_order.remove(&k);
        }
    }

    /// Inserts a row: false when its identity or its position is taken.
    pub fn insert(&mut self, key: SortKey, identity: Vec<u8>, piece: Vec<u8>) -> bool {
        if self.by_identity.contains_key(&identity) || self.by_order.contains_key(&key) {
            return false;
        }
        self.by_identity.insert(identity.clone(), key.clone());
        self.by_order.insert(key, (identity, piece));
        true
    }

    /// The pieces in order.
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.by_order.values().map(|(_, p)| p.as_slice())
    }

    /// Total size of the pieces.
    pub fn bytes(&self) -> usize {
        self.by_order.values().map(|(_, p)| p.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_compare_as_sqlite_orders_them() {
        use SortVal::*;
        let ordered = [
            Null,
            Int(i64::MIN),
            Real(-1.5),
            Int(-1),
            Real(-0.5),
            Int(0),
            Real(0.5),
            Int(1),
            Real(1.5),
            Real(9.3e18),
            Text(b"".to_vec()),
            Text(b"B".to_vec()),
            Text(b"a".to_vec()),
            Text(b"ab".to_vec()),
            Blob(vec![]),
            Blob(vec![0]),
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(a.cmp_sqlite(b), i.cmp(&j), "{a:?} vs {b:?}");
            }
        }
        assert_eq!(Int(2).cmp_sqlite(&Real(2.0)), Ordering::Equal);
        // i64::MAX as f64 rounds up to 2^63.
        assert_eq!(Int(i64::MAX).cmp_sqlite(&Real(i64::MAX as f64)), Ordering::Less);
    }

    #[test]
    fn rows_keep_order_and_refuse_ties_and_repeats() {
        let desc: std::sync::Arc<[bool]> = vec![true].into();
        let k = |i: i64| SortKey { vals: vec![SortVal::Int(i)], desc: desc.clone() };
        let mut r = Rows::new(1);
        assert!(r.push_in_order(k(3), b"c".to_vec(), b"3".to_vec()));
        assert!(r.push_in_order(k(1), b"a".to_vec(), b"1".to_vec()));
        assert!(!r.push_in_order(k(2), b"b".to_vec(), b"2".to_vec()), "out of order");
        assert!(r.insert(k(2), b"b".to_vec(), b"2".to_vec()));
        assert!(!r.insert(k(2), b"x".to_vec(), b"2".to_vec()), "tie");
        assert!(!r.insert(k(5), b"a".to_vec(), b"5".to_vec()), "identity repeats");
        assert_eq!(r.pieces().collect::<Vec<_>>(), vec![b"3", b"2", b"1"]);
        r.remove(b"c");
        assert_eq!(r.pieces().collect::<Vec<_>>(), vec![b"2", b"1"]);
        assert_eq!((r.len(), r.bytes()), (2, 2));
    }
}
