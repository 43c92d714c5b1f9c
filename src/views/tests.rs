use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rmpv::Value;
use rusqlite::Connection;

use super::published::{Change, Plan, Published};
use super::*;
use crate::config::{Codec, MemcachedConfig, Shape, TableRef, ViewConfig};
use crate::sink::Op;

fn db() -> Connection {
    let c = Connection::open_in_memory().unwrap();
    c.execute_batch(
        "CREATE TABLE application (id INTEGER PRIMARY KEY, name TEXT, price TEXT, created TEXT, score REAL, data BLOB, doc TEXT, gone TEXT);
         CREATE TABLE secret (id INTEGER PRIMARY KEY, v TEXT);
         CREATE TABLE _tailcache_state (id INTEGER PRIMARY KEY, file TEXT);
         ATTACH DATABASE ':memory:' AS otherdb;
         CREATE TABLE otherdb.t (id INTEGER PRIMARY KEY, app_id INTEGER, label TEXT);
         INSERT INTO application VALUES
           (1, 'Zoë ☃', '12.50', '2024-05-01 12:00:00.123456', 1.5, x'00ff10', '{\"b\":1,\"a\":[true,false,null,1.5,-3,\"ü\"],\"z\":{\"x\":18446744073709551615,\"y\":-9223372036854775808}}', NULL),
           (2, 'bob', '-0.01', '1999-12-31 23:59:59.000000', -2.25, x'', '[]', NULL);
         INSERT INTO otherdb.t VALUES (10, 1, 'first'), (11, 1, 'second'), (12, 2, 'third');",
    )
    .unwrap();
    c
}

fn watched() -> Vec<TableRef> {
    vec![
        TableRef { schema: "appdb".into(), name: "application".into(), qualified: false },
        TableRef { schema: "otherdb".into(), name: "t".into(), qualified: true },
    ]
}

fn mc(codec: Codec) -> MemcachedConfig {
    MemcachedConfig {
        servers: vec!["127.0.0.1:11211".into()],
        key_prefix: "p:".into(),
        codec,
        exptime: 0,
        max_item_size: 1024 * 1024,
        coalesce_ms: 2,
        timeout_ms: 1000,
        distribution: Default::default(),
        weights: Vec::new(),
    }
}

fn view(name: &str, key: &str, query: &str) -> ViewConfig {
    ViewConfig {
        name: name.into(),
        key: key.into(),
        query: query.into(),
        shape: Shape::Row,
        map_key: None,
        value_column: None,
        json_columns: vec![],
        on_error: Default::default(),
    }
}

fn compile(c: &Connection, views: &[ViewConfig], codec: Codec) -> ViewSet {
    match ViewSet::compile(c, views, &mc(codec), &watched()) {
        Ok(v) => v,
        Err(p) => panic!("{}", p.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n")),
    }
}

fn problems(c: &Connection, views: &[ViewConfig]) -> Vec<String> {
    match ViewSet::compile(c, views, &mc(Codec::Msgpack), &watched()) {
        Ok(_) => panic!("expected problems"),
        Err(p) => p.iter().map(|p| p.to_string()).collect(),
    }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn run(c: &Connection, vs: &ViewSet, i: usize) -> ComputedView {
    vs.compute(c, i, now(), &mut Scratch::default()).unwrap()
}

fn decode(b: &[u8]) -> Value {
    let mut r = b;
    let v = rmpv::decode::read_value(&mut r).unwrap();
    assert!(r.is_empty(), "trailing bytes");
    v
}

fn field<'a>(m: &'a Value, k: &str) -> &'a Value {
    m.as_map()
        .unwrap_or_else(|| panic!("not a map: {m}"))
        .iter()
        .find(|(key, _)| key.as_str() == Some(k))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no field {k} in {m}"))
}

fn keys_of(m: &Value) -> Vec<String> {
    m.as_map().unwrap().iter().map(|(k, _)| k.to_string()).collect()
}

const ALL: &str = "SELECT id, name, price, created, score, data, doc, gone FROM application ORDER BY id";

#[test]
fn row_shape_encodes_every_sqlite_type_in_column_order() {
    let c = db();
    let vs = compile(&c, &[view("app", "app:{id}", ALL)], Codec::Msgpack);
    let out = run(&c, &vs, 0);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    assert_eq!(out.entries.len(), 2);
    let e = &out.entries[0];
    assert_eq!(e.key, "p:app:1");
    assert_eq!(e.flags, 0);
    let v = decode(&e.value);
    assert_eq!(
        keys_of(&v),
        ["\"id\"", "\"name\"", "\"price\"", "\"created\"", "\"score\"", "\"data\"", "\"doc\"", "\"gone\""]
    );
    assert_eq!(field(&v, "id").as_i64(), Some(1));
    assert_eq!(field(&v, "name").as_str(), Some("Zoë ☃"));
    assert_eq!(field(&v, "price").as_str(), Some("12.50"));
    assert_eq!(field(&v, "created").as_str(), Some("2024-05-01 12:00:00.123456"));
    assert!(matches!(field(&v, "score"), Value::F64(f) if *f == 1.5));
    assert_eq!(field(&v, "data").as_slice(), Some(&[0u8, 255, 16][..]));
    assert!(field(&v, "doc").is_str(), "not a json column: stays text");
    assert!(field(&v, "gone").is_nil());
    let v2 = decode(&out.entries[1].value);
    assert_eq!(field(&v2, "data").as_slice(), Some(&[][..]));
    assert!(matches!(field(&v2, "score"), Value::F64(f) if *f == -2.25));
    // rmp_serde agrees on the same bytes
    #[derive(serde::Deserialize)]
    struct App {
        id: i64,
        name: String,
        price: String,
        score: f64,
        #[serde(with = "serde_bytes_compat")]
        data: Vec<u8>,
        gone: Option<String>,
    }
    mod serde_bytes_compat {
        pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
            }
            d.deserialize_bytes(V)
        }
    }
    let a: App = rmp_serde::from_slice(&e.value).unwrap();
    assert_eq!(
        (a.id, a.name.as_str(), a.price.as_str(), a.score, a.data, a.gone),
        (1, "Zoë ☃", "12.50", 1.5, vec![0, 255, 16], None)
    );
}

#[test]
fn json_columns_become_nested_msgpack_in_document_order() {
    let c = db();
    let mut v = view(
        "app",
        "app:{id}",
        "SELECT id, doc, json_object('n', name, 'k', 1, 'f', 0.5, 't', json('true')) AS built FROM application ORDER BY id",
    );
    v.json_columns = vec!["doc".into(), "built".into()];
    let vs = compile(&c, &[v], Codec::Msgpack);
    let out = run(&c, &vs, 0);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let row = decode(&out.entries[0].value);
    let doc = field(&row, "doc");
    assert_eq!(keys_of(doc), ["\"b\"", "\"a\"", "\"z\""]);
    assert_eq!(field(doc, "b").as_i64(), Some(1));
    let a = field(doc, "a").as_array().unwrap();
    assert_eq!(a[0], Value::Boolean(true));
    assert_eq!(a[1], Value::Boolean(false));
    assert!(a[2].is_nil());
    assert!(matches!(a[3], Value::F64(f) if f == 1.5));
    assert_eq!(a[4].as_i64(), Some(-3));
    assert_eq!(a[5].as_str(), Some("ü"));
    let z = field(doc, "z");
    assert_eq!(field(z, "x").as_u64(), Some(u64::MAX));
    assert_eq!(field(z, "y").as_i64(), Some(i64::MIN));
    let built = field(&row, "built");
    assert_eq!(field(built, "n").as_str(), Some("Zoë ☃"));
    assert_eq!(field(built, "k").as_i64(), Some(1));
    assert!(matches!(field(built, "f"), Value::F64(f) if *f == 0.5));
    assert_eq!(field(built, "t"), &Value::Boolean(true));
    let row2 = decode(&out.entries[1].value);
    assert_eq!(field(&row2, "doc").as_array().map(|a| a.len()), Some(0));
}

#[test]
fn invalid_json_rejects_only_that_entry_naming_view_key_and_column() {
    let c = db();
    c.execute("UPDATE application SET doc = '{not json' WHERE id = 2", []).unwrap();
    let mut v = view("app", "app:{id}", ALL);
    v.json_columns = vec!["doc".into()];
    let vs = compile(&c, &[v], Codec::Msgpack);
    let out = run(&c, &vs, 0);
    assert_eq!(out.entries.len(), 1);
    assert_eq!(out.entries[0].key, "p:app:1");
    assert_eq!(out.rejected.len(), 1);
    let msg = out.rejected[0].to_string();
    assert!(msg.contains("view \"app\"") && msg.contains("p:app:2") && msg.contains("\"doc\""), "{msg}");
}

#[test]
fn list_shape_with_value_column_keeps_query_order() {
    let c = db();
    let mut v = view("names", "names", "SELECT name FROM application ORDER BY id DESC");
    v.shape = Shape::List;
    v.value_column = Some("name".into());
    let mut rows = view("rows", "rows", "SELECT id, label FROM otherdb.t ORDER BY id");
    rows.shape = Shape::List;
    let mut empty = view("empty", "empty", "SELECT id FROM application WHERE id < 0");
    empty.shape = Shape::List;
    let vs = compile(&c, &[v, rows, empty], Codec::Msgpack);
    let out = run(&c, &vs, 0);
    assert_eq!(out.entries.len(), 1);
    assert_eq!(out.entries[0].key, "p:names");
    let l = decode(&out.entries[0].value);
    assert_eq!(l, Value::Array(vec!["bob".into(), "Zoë ☃".into()]));
    let l = decode(&run(&c, &vs, 1).entries[0].value);
    let a = l.as_array().unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(field(&a[2], "label").as_str(), Some("third"));
    assert_eq!(vs.views()[1].reads(), ["otherdb.t"]);
    assert_eq!(decode(&run(&c, &vs, 2).entries[0].value), Value::Array(vec![]));
}

#[test]
fn map_shape_later_duplicate_wins_at_first_position() {
    let c = db();
    let mut v = view("labels", "labels", "SELECT app_id, label FROM otherdb.t ORDER BY id");
    v.shape = Shape::Map;
    v.map_key = Some("app_id".into());
    v.value_column = Some("label".into());
    let mut full = view("apps", "apps", "SELECT name, id FROM application ORDER BY id");
    full.shape = Shape::Map;
    full.map_key = Some("name".into());
    let vs = compile(&c, &[v, full], Codec::Msgpack);
    let m = decode(&run(&c, &vs, 0).entries[0].value);
    assert_eq!(m, Value::Map(vec![(1.into(), "second".into()), (2.into(), "third".into())]));
    let m = decode(&run(&c, &vs, 1).entries[0].value);
    assert_eq!(keys_of(&m), ["\"Zoë ☃\"", "\"bob\""]);
    assert_eq!(field(field(&m, "bob"), "id").as_i64(), Some(2));
    // a NULL map key rejects the entry
    c.execute("UPDATE application SET name = NULL WHERE id = 2", []).unwrap();
    let out = run(&c, &vs, 1);
    assert!(out.entries.is_empty());
    assert!(out.rejected[0].to_string().contains("map_key column \"name\" is NULL"), "{}", out.rejected[0]);
}

#[test]
fn dogpile_codec_wraps_the_payload_as_cached_value() {
    let c = db();
    let vs = compile(&c, &[view("app", "app:{id}", ALL)], Codec::Dogpile);
    let plain = compile(&c, &[view("app", "app:{id}", ALL)], Codec::Msgpack);
    let e = &run(&c, &vs, 0).entries[0];
    let p = &run(&c, &plain, 0).entries[0];
    #[derive(serde::Deserialize)]
    struct Meta {
        ct: f64,
        v: u32,
    }
    let (_, meta): (serde::de::IgnoredAny, Meta) = rmp_serde::from_slice(&e.value).unwrap();
    assert_eq!((meta.ct, meta.v), (1_700_000_000.0, 2));
    let whole = decode(&e.value);
    let parts = whole.as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0], decode(&p.value));
    assert_eq!(keys_of(&parts[1]), ["\"ct\"", "\"v\""]);
    // the hash ignores the timestamp: computing later gives the same hash
    let later = vs.compute(&c, 0, now() + Duration::from_secs(5), &mut Scratch::default()).unwrap();
    assert_eq!(later.entries[0].hash, e.hash);
    assert_ne!(later.entries[0].value, e.value);
    assert_ne!(e.hash, p.hash, "codec is part of the hash");
}

#[test]
fn json_codec_is_valid_json_with_base64_blobs() {
    let c = db();
    let mut v = view("app", "app:{id}", ALL);
    v.json_columns = vec!["doc".into()];
    let mut m = view("labels", "labels", "SELECT app_id, label FROM otherdb.t ORDER BY id");
    m.shape = Shape::Map;
    m.map_key = Some("app_id".into());
    m.value_column = Some("label".into());
    let vs = compile(&c, &[v, m], Codec::Json);
    let out = run(&c, &vs, 0);
    let j: serde_json::Value = serde_json::from_slice(&out.entries[0].value).unwrap();
    assert_eq!(
        j,
        serde_json::json!({
            "id": 1, "name": "Zoë ☃", "price": "12.50", "created": "2024-05-01 12:00:00.123456",
            "score": 1.5, "data": "AP8Q",
            "doc": {"b": 1, "a": [true, false, null, 1.5, -3, "ü"], "z": {"x": 18446744073709551615u64, "y": i64::MIN}},
            "gone": null
        })
    );
    // key order is the column order
    let text = std::str::from_utf8(&out.entries[0].value).unwrap();
    assert!(text.starts_with("{\"id\":1,\"name\":"), "{text}");
    let j: serde_json::Value = serde_json::from_slice(&run(&c, &vs, 1).entries[0].value).unwrap();
    assert_eq!(j, serde_json::json!({"1": "second", "2": "third"}));
}

#[test]
fn key_template_renders_values_and_literal_braces() {
    let c = db();
    let vs = compile(&c, &[view("app", "app:{{{id}}}:{score}:{price}", ALL)], Codec::Msgpack);
    let keys: Vec<String> = run(&c, &vs, 0).entries.into_iter().map(|e| e.key).collect();
    assert_eq!(keys, ["p:app:{1}:1.5:12.50", "p:app:{2}:-2.25:-0.01"]);
}

#[test]
fn bad_keys_and_oversized_values_are_rejected_and_the_rest_published() {
    let c = db();
    c.execute_batch(&format!(
        "INSERT INTO application (id, name) VALUES (3, NULL), (4, 'has space'), (5, '{}'), (6, 'ok'), (7, 'big');
         UPDATE application SET doc = '{}' WHERE id = 7;",
        "x".repeat(300),
        "y".repeat(2000)
    ))
    .unwrap();
    let v = view("app", "app:{name}", ALL);
    let mut m = mc(Codec::Msgpack);
    m.max_item_size = 1024;
    let vs = ViewSet::compile(&c, &[v], &m, &watched()).unwrap();
    let out = run(&c, &vs, 0);
    let keys: Vec<&str> = out.entries.iter().map(|e| e.key.as_str()).collect();
    // row 1's name, "Zoë ☃", has a space too
    assert_eq!(keys, ["p:app:bob", "p:app:ok"]);
    let msgs: Vec<String> = out.rejected.iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 5, "{msgs:#?}");
    assert!(msgs[0].contains("p:app:Zoë ☃") && msgs[0].contains("' '"), "{}", msgs[0]);
    assert!(msgs[1].contains("view \"app\"") && msgs[1].contains("key column \"name\" is NULL"), "{}", msgs[1]);
    assert!(msgs[2].contains("p:app:has space") && msgs[2].contains("' '"), "{}", msgs[2]);
    assert!(msgs[3].contains("306 bytes") && msgs[3].contains("250"), "{}", msgs[3]);
    assert!(msgs[4].contains("p:app:big") && msgs[4].contains("max_item_size = 1024"), "{}", msgs[4]);
    assert!(matches!(&out.rejected[4], EntryError::TooLarge { size, .. } if *size > 2000));
}

#[test]
fn later_row_wins_a_duplicate_row_key() {
    let c = db();
    let vs = compile(
        &c,
        &[view("by_gone", "g:{price}", "SELECT id, '1' AS price FROM application ORDER BY id")],
        Codec::Msgpack,
    );
    let out = run(&c, &vs, 0);
    assert_eq!(out.entries.len(), 1);
    assert_eq!(out.duplicate_keys, 1);
    assert_eq!(field(&decode(&out.entries[0].value), "id").as_i64(), Some(2));
}

#[test]
fn compile_reports_every_problem_naming_the_view() {
    let c = db();
    let mut m = view("m", "m", "SELECT id FROM application");
    m.shape = Shape::Map;
    m.map_key = Some("nope".into());
    m.value_column = Some("nada".into());
    m.json_columns = vec!["zip".into()];
    let dup_a = {
        let mut v = view("a", "same", "SELECT id FROM application");
        v.shape = Shape::List;
        v
    };
    let dup_b = {
        let mut v = view("b", "same", "SELECT id FROM otherdb.t");
        v.shape = Shape::List;
        v
    };
    let p = problems(
        &c,
        &[
            view("bad_sql", "k:{id}", "SELEC id FROM application"),
            view("placeholder", "k:{nme}", "SELECT id, name FROM application"),
            view("unwatched", "k:{id}", "SELECT a.id FROM application a JOIN secret s ON s.id = a.id"),
            view("internal", "k:{id}", "SELECT id FROM _tailcache_state"),
            view("schema", "k:{name}", "SELECT name FROM sqlite_master"),
            view("dupcol", "k:{id}", "SELECT a.id, t.id FROM application a JOIN otherdb.t t ON t.app_id = a.id"),
            view("writes", "k:{id}", "DELETE FROM application RETURNING id"),
            view("two", "k:{id}", "SELECT id FROM application; SELECT 1"),
            m,
            dup_a,
            dup_b,
            view("sentinel", "_tailcache:epoch", "SELECT id FROM application").tap_list(),
        ],
    );
    let has = |view: &str, needle: &str| {
        assert!(
            p.iter().any(|m| m.starts_with(&format!("view \"{view}\": ")) && m.contains(needle)),
            "no problem for view {view} containing {needle:?} in:\n{}",
            p.join("\n")
        )
    };
    has("bad_sql", "does not compile");
    has("placeholder", "{nme} is not a column of the query's result (columns: id, name)");
    has("unwatched", "query reads table \"secret\" which is not watched; add it to mysql.tables or change the query");
    has("internal", "internal table \"_tailcache_state\"");
    has("schema", "\"sqlite_master\" which is not watched");
    has("dupcol", "more than one column named \"id\"");
    has("writes", "read-only");
    has("two", "does not compile");
    has("m", "map_key \"nope\"");
    has("m", "value_column \"nada\"");
    has("m", "json_columns entry \"zip\"");
    has("b", "key \"p:same\" is also written by view \"a\"");
    has("sentinel", "sentinel");
    assert!(!p.iter().any(|m| m.starts_with("view \"a\"")), "{p:?}");
}

trait TapList {
    fn tap_list(self) -> Self;
}
impl TapList for ViewConfig {
    fn tap_list(mut self) -> Self {
        self.shape = Shape::List;
        self
    }
}

#[test]
fn compile_accepts_ctes_json_each_and_attached_tables_and_records_reads() {
    let c = db();
    let vs = compile(
        &c,
        &[
            view(
                "cte",
                "c:{id}",
                "WITH x AS (SELECT id, name FROM application) SELECT x.id, (SELECT count(*) FROM otherdb.t WHERE app_id = x.id) AS n FROM x",
            ),
            view("each", "e:{key}", "SELECT j.key, j.value FROM application a, json_each(a.doc) j WHERE a.id = 1"),
            view("fixed", "f:{n}", "SELECT 1 AS n"),
        ],
        Codec::Msgpack,
    );
    assert_eq!(vs.views()[0].reads(), ["application", "otherdb.t"]);
    assert_eq!(vs.views()[1].reads(), ["application"]);
    assert!(vs.views()[2].reads().is_empty());
    let touched: HashSet<String> = ["otherdb.t".to_owned()].into();
    assert_eq!(vs.affected(&touched), vec![0]);
    let touched: HashSet<String> = ["application".to_owned()].into();
    assert_eq!(vs.affected(&touched), vec![0, 1]);
    let e = run(&c, &vs, 1);
    assert_eq!(e.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["p:e:b", "p:e:a", "p:e:z"]);
    assert_eq!(compute_all(&c, &vs, now()).unwrap().len(), 3);
}

#[test]
fn result_columns_changing_after_compile_is_a_view_error() {
    let c = db();
    let vs = compile(&c, &[view("star", "s:{id}", "SELECT * FROM otherdb.t")], Codec::Msgpack);
    c.execute_batch("ALTER TABLE otherdb.t ADD COLUMN extra TEXT").unwrap();
    let e = vs.compute(&c, 0, now(), &mut Scratch::default()).unwrap_err();
    assert!(e.to_string().contains("view \"star\"") && e.to_string().contains("extra"), "{e}");
}

pub(super) fn ops_summary(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|o| match o {
            Op::Set { key, .. } => format!("set {}", String::from_utf8_lossy(key)),
            Op::Delete { key } => format!("delete {}", String::from_utf8_lossy(key)),
        })
        .collect()
}

/// What the publisher does for a `row` view computed in full: pieces of
/// `piece` entries read on `reader`, each marked in a sweep on `c`, then
/// the keys that left.
pub(super) fn swept(reader: &Connection, c: &Connection, vs: &ViewSet, index: usize, piece: usize) -> Plan {
    let name: std::sync::Arc<str> = vs.views()[index].name().into();
    let mut sweep = Published::load(c).unwrap().begin(c, &name).unwrap();
    let mut plan = Plan::default();
    let mut add = |p: Plan| {
        plan.ops.extend(p.ops);
        plan.changes.extend(p.changes);
    };
    let mut scratch = Scratch::default();
    let mut stmt = vs.full_query(reader, index).unwrap();
    let mut rows = stmt.query([]).unwrap();
    loop {
        let (computed, done) = vs.row_piece(index, &mut rows, now(), &mut scratch, piece).unwrap();
        let marks = Published::mark(c, &mut sweep, &computed.entries).unwrap();
        add(Plan::sets(&name, computed.entries, &marks, vs.exptime(), vs.codec()));
        if done {
            break;
        }
    }
    add(Plan::deletes(&name, Published::unseen(c, &sweep, &[], usize::MAX).unwrap()));
    Published::end(c, sweep).unwrap();
    plan
}

#[test]
fn diff_against_published_state() {
    let c = db();
    let mut list = view("names", "names", "SELECT name FROM application ORDER BY id");
    list.shape = Shape::List;
    let views = [view("app", "app:{id}", "SELECT id, name FROM application"), list];
    let vs = compile(&c, &views, Codec::Msgpack);
    let mut published = Published::load(&c).unwrap();
    assert!(published.is_empty());

    let plan = published.diff(&c, compute_all(&c, &vs, now()).unwrap(), &vs).unwrap();
    assert_eq!(ops_summary(&plan.ops), ["set p:app:1", "set p:app:2", "set p:names"]);
    assert_eq!(plan.counts[0], published::ViewCounts { view: "app".into(), set: 2, deleted: 0, drift: 0 });
    published.record(&c, &plan.changes, None).unwrap();
    assert_eq!((published.keys("app"), published.keys("names")), (2, 1));

    // unchanged: nothing to do, in one piece or in many
    let plan = published.diff(&c, compute_all(&c, &vs, now()).unwrap(), &vs).unwrap();
    assert!(plan.is_empty(), "{:?}", ops_summary(&plan.ops));
    assert!(swept(&c, &c, &vs, 0, 1).is_empty());

    // a changed row and a removed row
    c.execute_batch("UPDATE application SET name = 'robert' WHERE id = 2; DELETE FROM application WHERE id = 1;")
        .unwrap();
    let plan = published.diff(&c, compute_all(&c, &vs, now()).unwrap(), &vs).unwrap();
    assert_eq!(ops_summary(&plan.ops), ["set p:app:2", "delete p:app:1", "set p:names"]);
    assert!(plan.changes.contains(&Change::Remove { view: "app".into(), key: b"p:app:1".to_vec() }));
    // the same, piece by piece
    let pieces = swept(&c, &c, &vs, 0, 1);
    assert_eq!(ops_summary(&pieces.ops), ["set p:app:2", "delete p:app:1"]);
    assert_eq!(pieces.changes, plan.changes[..2]);
    published.record(&c, &plan.changes, Some(b"tok")).unwrap();
    assert_eq!(published::read_epoch(&c).unwrap().as_deref(), Some(&b"tok"[..]));

    // the state survives a reload (restart)
    let mut reloaded = Published::load(&c).unwrap();
    assert_eq!(reloaded.keys("app"), 1);
    assert!(reloaded.diff(&c, compute_all(&c, &vs, now()).unwrap(), &vs).unwrap().is_empty());

    // a view removed from the config: its keys are to be deleted
    let fewer = compile(&c, &views[1..], Codec::Msgpack);
    assert_eq!(reloaded.orphan_views(&fewer), ["app"]);
    let keys = Published::keys_after(&c, "app", &[], 100).unwrap();
    let plan = Plan::deletes(&"app".into(), keys);
    assert_eq!(ops_summary(&plan.ops), ["delete p:app:2"]);
    reloaded.record(&c, &plan.changes, None).unwrap();
    assert!(reloaded.orphan_views(&fewer).is_empty());
    let n: i64 = c.query_row("SELECT count(*) FROM _tailcache_published WHERE view = 'app'", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0);
}

#[test]
fn a_view_in_pieces_keeps_the_later_row_of_a_repeated_key() {
    let c = db();
    // Every row renders one of two keys; the later row of each wins.
    let v = view("app", "app:{k}", "SELECT id % 2 AS k, name FROM application ORDER BY id");
    let vs = compile(&c, &[v], Codec::Msgpack);
    c.execute_batch("INSERT INTO application (id, name, doc) VALUES (3, 'carol', '{}'), (4, 'dave', '{}')").unwrap();
    let whole = compute_all(&c, &vs, now()).unwrap().remove(0);
    assert_eq!(whole.entries.len(), 2);
    for piece in [1, 2, 3, 100] {
        let mut published = Published::load(&c).unwrap();
        let plan = swept(&c, &c, &vs, 0, piece);
        // Replaying the sets in order leaves the whole computation's values.
        let mut cache = HashMap::new();
        for op in &plan.ops {
            if let Op::Set { key, value, .. } = op {
                cache.insert(key.clone(), value.clone());
            }
        }
        let expected: HashMap<Vec<u8>, Vec<u8>> =
            whole.entries.iter().map(|e| (e.key.as_bytes().to_vec(), e.value.clone())).collect();
        assert_eq!(cache, expected, "pieces of {piece}");
        published.record(&c, &plan.changes, None).unwrap();
        for e in &whole.entries {
            assert_eq!(Published::hash(&c, "app", e.key.as_bytes()).unwrap(), Some(e.hash), "pieces of {piece}");
        }
        assert_eq!(published.keys("app"), 2);
        c.execute_batch("DELETE FROM _tailcache_published").unwrap();
    }
}

#[test]
fn rejected_entry_deletes_the_previously_published_value() {
    let c = db();
    let mut v = view("app", "app:{id}", "SELECT id, doc FROM application");
    v.json_columns = vec!["doc".into()];
    let vs = compile(&c, &[v], Codec::Msgpack);
    let mut published = Published::load(&c).unwrap();
    let plan = published.diff(&c, compute_all(&c, &vs, now()).unwrap(), &vs).unwrap();
    published.record(&c, &plan.changes, None).unwrap();
    c.execute("UPDATE application SET doc = 'oops' WHERE id = 1", []).unwrap();
    let computed = compute_all(&c, &vs, now()).unwrap();
    assert_eq!(computed[0].rejected.len(), 1);
    let plan = published.diff(&c, computed, &vs).unwrap();
    assert_eq!(ops_summary(&plan.ops), ["delete p:app:1"]);
}
