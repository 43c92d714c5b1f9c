//! Offline decoding of real binlog files (tests/fixtures/binlog, see its
//! ATTRIBUTION.md): every rows event is decoded by our decoder and compared,
//! value by value, with mysql_common's own decoding mapped through the value
//! contract; known values from the fixtures' source SQL are asserted by hand.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;

use mysql_common::binlog::consts::{BinlogVersion, EventType};
use mysql_common::binlog::events::{EventData, TableMapEvent, TransactionPayloadEvent};
use mysql_common::binlog::jsondiff::{JsonDiff, JsonDiffOperation};
use mysql_common::binlog::value::BinlogValue;
use mysql_common::binlog::{BinlogFile, EventStreamReader};
use mysql_common::value::Value;
use rusqlite::types::ValueRef;
use tailcache::config::TableRef;
use tailcache::replica::value::format_timestamp_utc;
use tailcache::schema::{ColumnDef, TableSchema};
use tailcache::source::charset::{Charset, decode_string};
use tailcache::source::decode::{
    DecodeError, DecodeFailure, RowChange, RowDecoder, RowsKind, TableCodec, rows_kind, rows_table_id,
    schema_from_table_map,
};

#[derive(Debug, Clone, PartialEq)]
enum V {
    Null,
    I(i64),
    R(f64),
    T(String),
    B(Vec<u8>),
}

fn t(s: &str) -> V {
    V::T(s.to_owned())
}

impl V {
    fn of(v: &ValueRef<'_>) -> V {
        match *v {
            ValueRef::Null => V::Null,
            ValueRef::Integer(i) => V::I(i),
            ValueRef::Real(r) => V::R(r),
            ValueRef::Text(s) => V::T(String::from_utf8(s.to_vec()).expect("decoder produced invalid UTF-8")),
            ValueRef::Blob(b) => V::B(b.to_vec()),
        }
    }
}

#[derive(Debug)]
struct Change {
    table: String,
    kind: RowsKind,
    /// One image (insert/delete) or before + after (update).
    images: Vec<Vec<V>>,
}

#[derive(Default)]
struct Run {
    changes: Vec<Change>,
    /// Values compared against the oracle.
    compared: usize,
    /// Rows events seen (type → count) and payload events.
    event_types: HashMap<u8, usize>,
    schemas: HashMap<String, TableSchema>,
    errors: Vec<(String, DecodeError)>,
    /// JSON values the oracle cannot render (opaque scalars).
    opaque: usize,
    /// Partial JSON after-values (diff vectors) checked.
    partial_json: usize,
}

const OPAQUE: &str = "<opaque JSON the oracle cannot convert>";

fn fixture(path: &str) -> String {
    format!("{}/tests/fixtures/binlog/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn table_ref(tme: &TableMapEvent<'_>) -> TableRef {
    TableRef { schema: tme.database_name().into_owned(), name: tme.table_name().into_owned(), qualified: true }
}

type HandSchema<'a> = &'a dyn Fn(&TableMapEvent<'_>) -> Option<TableSchema>;

/// Decodes every rows event of a binlog file (including the events inside
/// TRANSACTION_PAYLOAD events) and checks each value against the oracle.
fn run(path: &str, hand: HandSchema<'_>) -> Run {
    let file = File::open(fixture(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut binlog = BinlogFile::new(BinlogVersion::Version4, BufReader::new(file)).expect("binlog header");
    let mut out = Run::default();
    let mut dec = RowDecoder::new();
    while let Some(ev) = binlog.next() {
        let ev = ev.unwrap_or_else(|e| panic!("{path}: {e}"));
        let ty = ev.header().event_type_raw();
        if ty == EventType::TRANSACTION_PAYLOAD_EVENT as u8 {
            *out.event_types.entry(ty).or_default() += 1;
            let tpe: TransactionPayloadEvent<'_> = ev.read_event().expect("payload event");
            let mut inner = tpe.decompressed().expect("decompress");
            let reader = binlog.reader_mut();
            while let Some(iev) = reader.read_decompressed(&mut inner).expect("inner event") {
                handle(path, &iev, reader, hand, &mut dec, &mut out);
            }
        } else {
            let reader = binlog.reader_mut();
            handle(path, &ev, reader, hand, &mut dec, &mut out);
        }
    }
    out
}

fn handle(
    path: &str,
    ev: &mysql_common::binlog::events::Event,
    reader: &EventStreamReader,
    hand: HandSchema<'_>,
    dec: &mut RowDecoder,
    out: &mut Run,
) {
    let ty = ev.header().event_type_raw();
    if rows_kind(ty).is_none() && ty != EventType::PARTIAL_UPDATE_ROWS_EVENT as u8 {
        return;
    }
    *out.event_types.entry(ty).or_default() += 1;
    let body = ev.data();
    let table_id = rows_table_id(body).expect("table id");
    let tme = reader.get_tme(table_id).unwrap_or_else(|| panic!("{path}: no table map for {table_id}"));
    let schema = schema_from_table_map(tme, table_ref(tme))
        .or_else(|| hand(tme))
        .unwrap_or_else(|| panic!("{path}: no schema for {}.{}", tme.database_name(), tme.table_name()));
    let table = schema.table.name.clone();
    out.schemas.insert(table.clone(), schema.clone());
    let codec = match TableCodec::new(tme, &schema) {
        Ok(c) => c,
        Err(e) => {
            out.errors.push((table, e));
            return;
        }
    };
    // The oracle: mysql_common's decoding of the same event.
    let Ok(Some(EventData::RowsEvent(rows))) = ev.read_data() else { panic!("{path}: oracle cannot read rows event") };
    let mut oracle_rows = Vec::new();
    for row in rows.rows(tme) {
        let (before, after) = row.unwrap_or_else(|e| panic!("{path}: oracle: {e}"));
        let mut images = Vec::new();
        for img in [before, after].into_iter().flatten() {
            let vals: Vec<Option<BinlogValue<'static>>> =
                (0..img.len()).map(|i| img.as_ref(i).map(|v| v.clone().into_owned())).collect();
            images.push(vals);
        }
        oracle_rows.push(images);
    }
    let kind = rows_kind(ty);
    let mut changes = Vec::new();
    let res = dec.decode(ty, body, &codec, &mut |c: RowChange<'_>| {
        let images = match c {
            RowChange::Insert(r) | RowChange::Delete(r) => vec![r.iter().map(V::of).collect()],
            RowChange::Update { before, after } => {
                vec![before.iter().map(V::of).collect(), after.iter().map(V::of).collect()]
            }
        };
        changes.push(Change { table: table.clone(), kind: kind.expect("kind"), images });
        Ok(())
    });
    match res {
        Ok(()) => {}
        Err(DecodeFailure::Decode(e)) => {
            out.errors.push((table, e));
            return;
        }
        Err(DecodeFailure::Callback(e)) => panic!("{e}"),
    }
    assert_eq!(changes.len(), oracle_rows.len(), "{path}: row count for {table}");
    for (ch, orow) in changes.iter().zip(&oracle_rows) {
        assert_eq!(ch.images.len(), orow.len(), "{path}: image count");
        for (img, oimg) in ch.images.iter().zip(orow) {
            assert_eq!(img.len(), schema.columns.len());
            for (k, ((v, o), col)) in img.iter().zip(oimg).zip(&schema.columns).enumerate() {
                let expected = match o {
                    // A partial JSON after-value: the oracle applies the
                    // diffs to its own before-value.
                    Some(BinlogValue::JsonDiff(diffs)) => {
                        out.partial_json += 1;
                        oracle_partial_json(orow[0][k].as_ref(), diffs)
                    }
                    _ => oracle_value(o.as_ref(), col, tme),
                };
                let same = match (&expected, v) {
                    (V::R(a), V::R(b)) => a == b || (a.is_nan() && b.is_nan()),
                    (V::T(a), V::T(b)) if col.data_type == "json" && a == OPAQUE => {
                        out.opaque += 1;
                        serde_json::from_str::<serde_json::Value>(b).is_ok()
                    }
                    (V::T(a), V::T(b)) if col.data_type == "json" => {
                        let a: serde_json::Value = serde_json::from_str(a).expect("oracle JSON");
                        let b: serde_json::Value = serde_json::from_str(b)
                            .unwrap_or_else(|e| panic!("{path}: our JSON {b:?} does not parse: {e}"));
                        a == b
                    }
                    _ => expected == *v,
                };
                assert!(same, "{path}: {table}.{}: decoded {v:?}, oracle {expected:?}", col.name);
                out.compared += 1;
            }
        }
    }
    out.changes.extend(changes);
}

/// An independent application of mysql_common's parsed JSON diffs to its
/// before-value, on serde_json values (compared as JSON, not as text).
fn oracle_partial_json(before: Option<&BinlogValue<'_>>, diffs: &[JsonDiff<'_>]) -> V {
    let Some(BinlogValue::Jsonb(j)) = before else { panic!("partial JSON without a JSON before-value: {before:?}") };
    V::T(oracle_apply(serde_json::Value::try_from(j.clone()).expect("oracle before JSON"), diffs).to_string())
}

fn oracle_apply(mut doc: serde_json::Value, diffs: &[JsonDiff<'_>]) -> serde_json::Value {
    for d in diffs {
        let path = d.path_str().into_owned();
        let legs = oracle_path(&path);
        let (last, parents) = legs.split_last().expect("diff at the root");
        let mut parent = &mut doc;
        for leg in parents {
            parent = match leg {
                Ok(name) => parent.get_mut(name.as_str()),
                Err(i) => parent.get_mut(*i),
            }
            .unwrap_or_else(|| panic!("oracle: {path} does not resolve"));
        }
        let value = d.value().map(|v| serde_json::Value::try_from(v.clone()).expect("oracle diff value"));
        match (d.operation(), last, parent) {
            (JsonDiffOperation::REPLACE, Ok(name), serde_json::Value::Object(m)) => {
                m.insert(name.clone(), value.expect("value"));
            }
            (JsonDiffOperation::REPLACE, Err(i), serde_json::Value::Array(a)) => a[*i] = value.expect("value"),
            (JsonDiffOperation::INSERT, Ok(name), serde_json::Value::Object(m)) => {
                assert!(m.insert(name.clone(), value.expect("value")).is_none());
            }
            (JsonDiffOperation::INSERT, Err(i), serde_json::Value::Array(a)) => {
                a.insert((*i).min(a.len()), value.expect("value"))
            }
            (JsonDiffOperation::REMOVE, Ok(name), serde_json::Value::Object(m)) => {
                m.shift_remove(name.as_str()).expect("removed member");
            }
            (JsonDiffOperation::REMOVE, Err(i), serde_json::Value::Array(a)) => {
                a.remove(*i);
            }
            (op, leg, parent) => panic!("oracle cannot apply {op:?} {leg:?} to {parent}"),
        }
    }
    doc
}

/// `$.a[1]."b c"` → [Ok("a"), Err(1), Ok("b c")] (no `last`, no spaces).
fn oracle_path(path: &str) -> Vec<Result<String, usize>> {
    let mut rest = path.strip_prefix('$').unwrap_or_else(|| panic!("oracle path {path}"));
    let mut legs = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("[") {
            let (n, r) = r.split_once(']').expect("]");
            legs.push(Err(n.parse().expect("index")));
            rest = r;
        } else if let Some(r) = rest.strip_prefix(".\"") {
            let end = r.find('"').expect("closing quote (no escapes in this oracle)");
            legs.push(Ok(r[..end].to_owned()));
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            legs.push(Ok(r[..end].to_owned()));
            rest = &r[end..];
        } else {
            panic!("oracle path {path}");
        }
    }
    legs
}

/// The oracle's value mapped through the value contract, written
/// independently of the decoder's own formatting where practical.
fn oracle_value(o: Option<&BinlogValue<'_>>, col: &ColumnDef, tme: &TableMapEvent<'_>) -> V {
    let _ = tme;
    let Some(o) = o else { panic!("oracle lacks column {}", col.name) };
    let dt = col.data_type.as_str();
    match o {
        BinlogValue::Value(Value::NULL) => V::Null,
        BinlogValue::Jsonb(j) => {
            // mysql_common cannot convert opaque scalars (DECIMAL/DATE/...
            // inside JSON) to serde_json: those are checked by hand below.
            match serde_json::Value::try_from(j.clone()) {
                Ok(json) => V::T(json.to_string()),
                Err(_) => V::T(OPAQUE.into()),
            }
        }
        BinlogValue::JsonDiff(_) => panic!("partial JSON in a full image"),
        BinlogValue::Value(v) => match (dt, v) {
            ("enum", Value::Int(i)) => {
                if *i == 0 {
                    t("")
                } else {
                    V::T(col.labels[*i as usize - 1].clone())
                }
            }
            ("set", Value::Bytes(b)) => {
                let mut mask = 0u64;
                for (k, x) in b.iter().enumerate() {
                    mask |= u64::from(*x) << (8 * k);
                }
                let labels: Vec<&str> = col
                    .labels
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| mask & (1 << k) != 0)
                    .map(|(_, l)| l.as_str())
                    .collect();
                V::T(labels.join(","))
            }
            ("bit", Value::Bytes(b)) => V::I(b.iter().fold(0i64, |a, x| (a << 8) | i64::from(*x))),
            ("year", Value::Bytes(b)) => {
                let y: i64 = std::str::from_utf8(b).unwrap().parse().unwrap();
                V::I(if y == 1900 { 0 } else { y })
            }
            ("timestamp", Value::Bytes(b)) => {
                let s = std::str::from_utf8(b).unwrap();
                let (secs, micros) = match s.split_once('.') {
                    Some((a, b)) => (a.parse::<i64>().unwrap(), b.parse::<u64>().unwrap()),
                    None => (s.parse::<i64>().unwrap(), 0),
                };
                let mut out = Vec::new();
                format_timestamp_utc(&mut out, secs, micros, col.datetime_precision.unwrap_or(0) as u8);
                V::T(String::from_utf8(out).unwrap())
            }
            ("decimal", Value::Bytes(b)) => V::T(String::from_utf8(b.clone()).unwrap()),
            (_, Value::Bytes(b)) => {
                let charset = col.charset.as_deref().unwrap_or("binary");
                let blob =
                    charset == "binary" || dt.ends_with("blob") || dt.ends_with("binary") || dt.starts_with("geom");
                if blob {
                    let mut b = b.clone();
                    if dt == "binary" {
                        let n: usize =
                            col.column_type.trim_start_matches("binary(").trim_end_matches(')').parse().unwrap();
                        b.resize(n.max(b.len()), 0);
                    }
                    V::B(b)
                } else {
                    V::T(decode_string(Charset::from_mysql_name(charset), b))
                }
            }
            (_, Value::NULL) => V::Null,
            (_, Value::Int(i)) => V::I(*i),
            (_, Value::UInt(u)) => {
                if *u > i64::MAX as u64 {
                    V::T(u.to_string())
                } else {
                    V::I(*u as i64)
                }
            }
            (_, Value::Float(f)) => V::R(format!("{f}").parse::<f64>().unwrap()),
            (_, Value::Double(d)) => V::R(*d),
            ("date", Value::Date(y, m, d, ..)) => V::T(format!("{y:04}-{m:02}-{d:02}")),
            (_, Value::Date(y, mo, d, h, mi, s, us)) => {
                let fsp = col.datetime_precision.unwrap_or(0) as usize;
                let frac = if fsp > 0 { format!(".{}", &format!("{us:06}")[..fsp]) } else { String::new() };
                V::T(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}{frac}"))
            }
            (_, Value::Time(neg, days, h, m, s, us)) => {
                let fsp = col.datetime_precision.unwrap_or(0) as usize;
                let frac = if fsp > 0 { format!(".{}", &format!("{us:06}")[..fsp]) } else { String::new() };
                let hours = days * 24 + u32::from(*h);
                V::T(format!("{}{hours:02}:{m:02}:{s:02}{frac}", if *neg { "-" } else { "" }))
            }
        },
    }
}

fn assert_clean(path: &str, r: &Run) {
    assert!(r.errors.is_empty(), "{path}: decode errors {:?}", r.errors);
    assert!(!r.changes.is_empty(), "{path}: no rows decoded");
    assert!(r.compared > 0);
}

fn no_hand(_: &TableMapEvent<'_>) -> Option<TableSchema> {
    None
}

fn one_col(
    name: &'static str,
    data_type: &'static str,
    column_type: &'static str,
) -> impl Fn(&TableMapEvent<'_>) -> Option<TableSchema> {
    move |tme| {
        Some(TableSchema {
            table: table_ref(tme),
            columns: vec![col(name, data_type, column_type)],
            primary_key: vec![],
        })
    }
}

#[test]
fn minimal_metadata_time2_large_negative_hour() {
    // rust_mysql_common's own test: the value is Time(neg, 21 days, 03:48:27).
    let p = "rust_mysql_common/time_issue.000001";
    let r = run(p, &one_col("t", "time", "time"));
    assert_clean(p, &r);
    assert_eq!(r.changes[0].images[0], vec![t("-507:48:27")]);
}

#[test]
fn compressed_transaction_payload() {
    // TRANSACTION_PAYLOAD (zstd) holding TABLE_MAP + WRITE_ROWS_V2 for a
    // one-INT-column table test.tb1 (MINIMAL metadata).
    let p = "rust_mysql_common/transaction_compression.000001";
    let r = run(p, &one_col("a", "int", "int"));
    assert_clean(p, &r);
    assert_eq!(r.event_types.get(&40), Some(&1));
    assert_eq!(r.event_types.get(&30), Some(&1));
    assert!(matches!(r.changes[0].images[0][0], V::I(_)));
}

fn col(name: &str, data_type: &str, column_type: &str) -> ColumnDef {
    let charset = match data_type {
        "char" | "varchar" | "text" | "enum" | "set" => Some("utf8mb4".to_owned()),
        "varbinary" | "blob" | "binary" => Some("binary".to_owned()),
        _ => None,
    };
    let dtp = column_type.strip_prefix(data_type).and_then(|r| r.trim_matches(|c| c == '(' || c == ')').parse().ok());
    ColumnDef {
        name: name.into(),
        data_type: data_type.into(),
        column_type: column_type.into(),
        unsigned: column_type.contains("unsigned"),
        charset,
        numeric_precision: None,
        numeric_scale: None,
        datetime_precision: if matches!(data_type, "datetime" | "time" | "timestamp") {
            Some(dtp.unwrap_or(0))
        } else {
            None
        },
        labels: tailcache::schema::parse_labels(column_type),
        nullable: true,
    }
}

/// The DDL documented in the MySqlCdc binlog's own CREATE TABLE (MySQL 5.7,
/// no optional metadata in its TABLE_MAPs).
fn mysqlcdc_schema(tme: &TableMapEvent<'_>) -> Option<TableSchema> {
    tme.table_name().eq_ignore_ascii_case("MySqlCdc").then(|| TableSchema {
        table: table_ref(tme),
        columns: vec![
            col("Id", "int", "int(11)"),
            col("TinyColumn", "tinyint", "tinyint(4)"),
            col("ShortColumn", "smallint", "smallint(6)"),
            col("Int24Column", "mediumint", "mediumint(9)"),
            col("Int32Column", "int", "int(11)"),
            col("LongColumn", "bigint", "bigint(20)"),
            col("FloatColumn", "float", "float"),
            col("DoubleColumn", "double", "double"),
            col("DecimalColumn", "decimal", "decimal(65,10)"),
            col("CharColumn", "char", "char(200)"),
            col("VarcharColumn", "varchar", "varchar(700)"),
            col("VarstringColumn", "varbinary", "varbinary(800)"),
            col("JsonColumn", "json", "json"),
            col("BlobColumn", "blob", "blob"),
            col("BitColumn", "bit", "bit(28)"),
            col("EnumColumn", "enum", "enum('Low','Medium','High')"),
            col("SetColumn", "set", "set('Green','Yellow','Red')"),
            col("YearColumn", "year", "year(4)"),
            col("DateColumn", "date", "date"),
            col("DateTimeColumn", "datetime", "datetime(3)"),
            col("TimeColumn", "time", "time(2)"),
            col("TimestampColumn", "timestamp", "timestamp(3)"),
        ],
        primary_key: vec![0],
    })
}

#[test]
fn full_metadata_enum_set_char_text() {
    let p = "rust_mysql_common/mysql-enum-string-set.000001";
    let r = run(p, &no_hand);
    assert_clean(p, &r);
    // v2 write, update and delete events, FULL metadata (names + labels).
    assert_eq!(r.event_types.get(&30), Some(&1));
    assert_eq!(r.event_types.get(&31), Some(&1));
    assert_eq!(r.event_types.get(&32), Some(&1));
    let s = &r.schemas["t"];
    let names: Vec<&str> = s.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["f1", "f2", "f3", "f4", "f5"]);
    assert_eq!(s.columns[2].labels, ["var1", "variant2", "foo"]);
    assert_eq!(s.columns[3].labels, ["one", "two", "three", "four"]);
    assert_eq!(s.columns[0].charset.as_deref(), Some("utf8mb4"));
    let digits100: String = "0123456789".repeat(10);
    let ins = &r.changes[0];
    assert_eq!(ins.kind, RowsKind::Write);
    assert_eq!(ins.images[0][0], V::T(digits100.clone()));
    assert_eq!(ins.images[0][2], t("var1"));
    assert_eq!(ins.images[0][3], t("one,three"));
    assert_eq!(ins.images[0][4], t("0123456789"));
    let upd = &r.changes[1];
    assert_eq!(upd.kind, RowsKind::Update);
    assert_eq!(upd.images[0][2], t("var1"));
    assert_eq!(&upd.images[1][..4], &[t("field1"), t("field_2"), t("variant2"), t("two,four")]);
    let del = &r.changes[2];
    assert_eq!(del.kind, RowsKind::Delete);
    assert_eq!(del.images[0], upd.images[1]);
}

/// The fixture's table (MINIMAL metadata, so no names in the table map):
/// `CREATE TABLE t(id INT PRIMARY KEY AUTO_INCREMENT, json_col JSON,
/// name VARCHAR(100) AS (json_col->>'$.name'), age INT AS (json_col->'$.age'))`.
fn json_binlog_schema(tme: &TableMapEvent<'_>) -> Option<TableSchema> {
    (tme.table_name() == "t").then(|| TableSchema {
        table: table_ref(tme),
        columns: vec![
            col("id", "int", "int"),
            col("json_col", "json", "json"),
            col("name", "varchar", "varchar(100)"),
            col("age", "int", "int"),
        ],
        primary_key: vec![0],
    })
}

/// The PARTIAL_UPDATE_ROWS event of json.binlog.000001 (`UPDATE t SET
/// json_col = JSON_SET(json_col, '$.age', ...)` on six rows), as raw body
/// plus mysql_common's parse of its rows, and the table map.
fn partial_event(path: &str) -> (Vec<u8>, Vec<Vec<JsonDiff<'static>>>, TableMapEvent<'static>) {
    let file = File::open(fixture(path)).unwrap();
    let mut binlog = BinlogFile::new(BinlogVersion::Version4, BufReader::new(file)).unwrap();
    while let Some(ev) = binlog.next() {
        let ev = ev.unwrap();
        if ev.header().event_type_raw() != EventType::PARTIAL_UPDATE_ROWS_EVENT as u8 {
            continue;
        }
        let tme = binlog.reader_mut().get_tme(rows_table_id(ev.data()).unwrap()).unwrap().clone();
        let Ok(Some(EventData::RowsEvent(rows))) = ev.read_data() else { panic!("oracle cannot read the event") };
        let mut diffs = Vec::new();
        for row in rows.rows(&tme) {
            let (_, after) = row.unwrap();
            match after.unwrap().as_ref(0) {
                Some(BinlogValue::JsonDiff(d)) => diffs.push(d.iter().map(|x| x.clone().into_owned()).collect()),
                other => panic!("json_col is not partial: {other:?}"),
            }
        }
        return (ev.data().to_vec(), diffs, tme);
    }
    panic!("{path}: no PARTIAL_UPDATE_ROWS event");
}

#[test]
fn partial_json_update_event() {
    use tailcache::source::json_diff::{self, DiffOp};
    let p = "rust_mysql_common/json.binlog.000001";
    let r = run(p, &json_binlog_schema);
    assert_eq!(r.event_types.get(&39), Some(&1), "one PARTIAL_UPDATE_ROWS event");
    // That event was logged with binlog_row_image=MINIMAL (before image: id
    // only), which tailcache refuses like any MINIMAL image; everything
    // else in the file decodes and matches the oracle.
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(matches!(&r.errors[0].1, DecodeError::PartialImage(m) if m.contains("json_col") || m.contains("column 2")));
    // The documents before the partial update: the after images of the
    // preceding UPDATE_ROWS (age + 1 on every row).
    let before_docs: Vec<(i64, String)> = r
        .changes
        .iter()
        .filter(|c| c.kind == RowsKind::Update)
        .map(|c| match (&c.images[1][0], &c.images[1][1]) {
            (V::I(id), V::T(doc)) => (*id, doc.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(before_docs.len(), 6);
    assert_eq!(before_docs[0].1, r#"{"age": 25, "data": "xxxxxxxxxx", "name": "Joe"}"#);

    // The event's rows, walked by hand (MINIMAL images of this table):
    // before {nulls, id} | value_options | partial bits | after {nulls,
    // json_col (u32 length + diff vector), name (u16 length), age}.
    let (body, oracle_diffs, tme) = partial_event(p);
    assert_eq!(&body[8..13], &[2, 0, 4, 0x01, 0x0e], "v2 header, 4 columns, MINIMAL bitmaps");
    let mut at = 13;
    let mut take = |n: usize| {
        at += n;
        &body[at - n..at]
    };
    let mut results = Vec::new();
    for (row, (id, before)) in before_docs.iter().enumerate() {
        assert_eq!(take(1), [0], "before nulls");
        assert_eq!(i64::from(i32::from_le_bytes(take(4).try_into().unwrap())), *id);
        assert_eq!(take(2), [1, 1], "value_options PARTIAL_JSON_UPDATES, json_col partial");
        assert_eq!(take(1), [0], "after nulls");
        let len = u32::from_le_bytes(take(4).try_into().unwrap()) as usize;
        let diffs = take(len).to_vec();
        let nlen = u16::from_le_bytes(take(2).try_into().unwrap()) as usize;
        let name = String::from_utf8(take(nlen).to_vec()).unwrap();
        let age = i64::from(i32::from_le_bytes(take(4).try_into().unwrap()));

        // Our parse of MySQL's bytes agrees with mysql_common's.
        let ours: Vec<_> = json_diff::parse_diffs(&diffs).collect::<Result<_, _>>().unwrap();
        assert_eq!(ours.len(), oracle_diffs[row].len());
        for (a, b) in ours.iter().zip(&oracle_diffs[row]) {
            assert_eq!(a.op, DiffOp::Replace);
            assert_eq!(b.operation(), JsonDiffOperation::REPLACE);
            assert_eq!(a.path, b.path());
            assert_eq!(a.path, b"$.age");
        }
        // Applying them to the document before gives the document after:
        // its $.age and $.name agree with the generated columns MySQL
        // computed from it in the same image, and with the oracle.
        let before_json: serde_json::Value = serde_json::from_str(before).unwrap();
        let after = json_diff::apply_diffs(&json_diff::jsonb_from_serde(&before_json), &diffs).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&after).unwrap();
        assert_eq!(parsed["age"], serde_json::json!(age));
        assert_eq!(parsed["name"], serde_json::json!(name));
        assert_eq!(parsed, oracle_apply(before_json, &oracle_diffs[row]));
        results.push((before.clone(), diffs, name, age, after));
    }
    assert_eq!(at, body.len(), "all rows walked");
    let texts: Vec<&str> = results.iter().map(|r| r.4.as_str()).collect();
    assert_eq!(
        texts,
        [
            r#"{"age": 26, "data": "xxxxxxxxxx", "name": "Joe"}"#,
            r#"{"age": 34, "data": "yyyyyyyyyy", "name": "Sue"}"#,
            r#"{"age": 42, "data": "zzzzzzzzzz", "name": "Pete"}"#,
            r#"{"age": 26, "data": "xxxxxxxxxx", "name": "Joe"}"#,
            r#"{"age": 34, "data": "yyyyyyyyyy", "name": "Sue"}"#,
            r#"{"age": 42, "data": "zzzzzzzzzz", "name": "Pete"}"#,
        ]
    );

    // The same diff vectors in a FULL-image event (what MySQL logs with
    // binlog_row_image=FULL), through the decoder with the file's table map.
    let schema = json_binlog_schema(&tme).unwrap();
    let codec = TableCodec::new(&tme, &schema).unwrap();
    let mut full = body[..10].to_vec();
    full.extend_from_slice(&[4, 0x0f, 0x0f]);
    for (row, (before, diffs, name, age, _)) in results.iter().enumerate() {
        let id = (row as i32 + 1).to_le_bytes();
        let jsonb = json_diff::jsonb_from_serde(&serde_json::from_str(before).unwrap());
        let image = |json: &[u8], age: i64, out: &mut Vec<u8>| {
            out.push(0);
            out.extend_from_slice(&id);
            out.extend_from_slice(&(json.len() as u32).to_le_bytes());
            out.extend_from_slice(json);
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(age as i32).to_le_bytes());
        };
        image(&jsonb, age - 1, &mut full);
        full.extend_from_slice(&[1, 1]);
        image(diffs, *age, &mut full);
    }
    let mut got = Vec::new();
    RowDecoder::new()
        .decode(39, &full, &codec, &mut |c| {
            let RowChange::Update { before, after } = c else { panic!("not an update") };
            got.push((before.iter().map(V::of).collect::<Vec<_>>(), after.iter().map(V::of).collect::<Vec<_>>()));
            Ok(())
        })
        .unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(got[0].0, [V::I(1), t(r#"{"age": 25, "data": "xxxxxxxxxx", "name": "Joe"}"#), t("Joe"), V::I(25)]);
    assert_eq!(got[0].1, [V::I(1), t(r#"{"age": 26, "data": "xxxxxxxxxx", "name": "Joe"}"#), t("Joe"), V::I(26)]);
    for ((_, after), (_, _, _, _, text)) in got.iter().zip(&results) {
        assert_eq!(after[1], t(text));
    }
}

#[test]
fn full_metadata_bit() {
    let p = "rust_mysql_common/mysql_type_bit.000001";
    let r = run(p, &no_hand);
    assert_clean(p, &r);
    // BIT(3) b'100' = 4, BIT(8) b'00100000' = 32.
    assert_eq!(r.changes[0].images[0], vec![V::I(4), t("foo"), V::I(32)]);
    assert_eq!(r.schemas["foo"].columns[0].column_type, "bit(3)");
}

#[test]
fn full_metadata_json_incl_opaque() {
    let p = "rust_mysql_common/json-opaque.binlog";
    let r = run(p, &no_hand);
    assert_clean(p, &r);
    let got: Vec<&V> = r.changes.iter().map(|c| &c.images[0][0]).collect();
    // MySQL prints JSON with ", " and ": ", DATE/DATETIME/TIME opaque
    // scalars as quoted strings with 6 fractional digits, DECIMAL as a
    // number, other opaque values as "base64:typeNN:...".
    assert_eq!(
        got,
        [
            &t(r#"{"a": "base64:type15:VQ=="}"#),
            &t(r#"{"b": "2012-03-18"}"#),
            &t(r#"{"c": "2012-03-18 11:30:45.000000"}"#),
            &t(r#"{"c": "87:31:46.654321"}"#),
            &t(r#"{"d": 123.456}"#),
            &t(r#"{"e": 9.00}"#),
            &t(r#"{"e": [0, 1, true, false]}"#),
            &t(r#"{"e": null}"#),
        ]
    );
    assert!(r.opaque >= 4, "opaque values were checked by hand: {}", r.opaque);
}

#[test]
fn mariadb_v1_rows_full_metadata() {
    let p = "rust_mysql_common/mariadb-bin.000001";
    let r = run(p, &no_hand);
    assert_clean(p, &r);
    assert_eq!(r.event_types.get(&23), Some(&2), "MariaDB writes v1 rows events");
    let s = &r.schemas["outbox"];
    assert_eq!(s.primary_key, [0]);
    assert_eq!(s.columns[2].labels, ["BLOB", "JSON", "PROTOBUF"]);
    // INSERT INTO outbox (topic, event_type, event) VALUES ('foo', 'JSON', '{"foo":1}')
    let row = &r.changes[0].images[0];
    assert_eq!(row[0], V::I(62));
    assert_eq!(row[1], t("foo"));
    assert_eq!(row[2], t("JSON"));
    assert_eq!(row[3], V::B(br#"{"foo":1}"#.to_vec()));
    assert_eq!(row[4], t("2022-04-20 22:18:04"));
    assert_eq!(r.changes[1].images[0][0], V::I(63));
    assert!(r.changes.iter().all(|c| c.table == "outbox"));
}

#[test]
fn mysql57_many_types_hand_schema() {
    let p = "MySqlCdc/mysql-bin.000001";
    let r = run(p, &mysqlcdc_schema);
    assert_clean(p, &r);
    // Row 1 of the sample's INSERT, as SELECT shows it.
    let expected = vec![
        V::I(11),
        V::I(121),
        V::I(12341),
        V::I(1234561),
        V::I(123456789),
        V::I(1234567890987654321),
        V::R(12345.679), // FLOAT via its shortest f32 form
        V::R(123456789.09876543),
        t("1234567890112233445566778899001112223334445556667778889.9900011112"),
        t("Bsd234234 234234 zdfsfsdfsdf"),
        t("Hello world!"),
        V::B(vec![18, 52, 86, 69, 52, 69, 69, 52]),
        t(r#"{"id": 1, "name": "John"}"#),
        V::B(vec![21, 35, 84]),
        V::I(129324935),
        t("Medium"),
        t("Red"),
        V::I(1989),
        t("1985-10-23"),
        t("1988-11-27 14:12:13.345"),
        t("15:22:33.67"),
        t("1985-10-13 10:22:23.567"),
    ];
    assert_eq!(r.changes[0].images[0], expected);
}
