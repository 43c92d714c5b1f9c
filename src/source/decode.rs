//! Row-event decoding for watched tables, straight from the event bytes into
//! SQLite values (the README's value-mapping contract), with buffers reused
//! across rows so the hot path does not allocate per row.
//!
//! Layout of a rows event body (`Event::data()`: after the 19-byte common
//! header; mysql_common already strips the CRC32 footer):
//!
//! ```text
//! table_id u48 | flags u16 | [v2: extra_len u16 (incl. itself) + extra]
//! column_count lenenc | present bitmap [| present bitmap (update after)]
//! rows: { null bitmap over present columns, values } (twice for updates)
//! ```
//!
//! The formatting helpers (`format_date`, `format_datetime`, `format_time`,
//! `format_decimal_bin`, `format_json`, `float_to_f64`, ...) are public so the
//! snapshot code can produce identical strings from protocol values.

use std::io::Write as _;

use mysql_common::binlog::events::{OptionalMetaExtractor, OptionalMetadataField, TableMapEvent};
use mysql_common::collations::{Collation, CollationId};
use mysql_common::constants::ColumnType;
use rusqlite::types::ValueRef;

use crate::config::TableRef;
use crate::schema::{ColumnDef, TableSchema};
use crate::source::charset::{self, Charset};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The TABLE_MAP does not describe the schema we hold (DDL happened):
    /// re-read the schema and re-snapshot the table.
    #[error("table map does not match the known schema: {0}")]
    Mismatch(String),
    /// Only FULL row images can be applied as upserts.
    #[error("rows event lacks a full row image ({0}); set binlog_row_image=FULL")]
    PartialImage(String),
    #[error("malformed rows event: {0}")]
    Malformed(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Why `RowDecoder::decode` stopped: the event or the callback.
#[derive(Debug)]
pub enum DecodeFailure {
    Decode(DecodeError),
    Callback(crate::Error),
}

impl From<DecodeError> for DecodeFailure {
    fn from(e: DecodeError) -> Self {
        DecodeFailure::Decode(e)
    }
}

pub use crate::replica::action::RowChange;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsKind {
    Write,
    Update,
    Delete,
}

/// Binlog event type codes used here.
pub mod event_type {
    pub const WRITE_ROWS_V1: u8 = 23;
    pub const UPDATE_ROWS_V1: u8 = 24;
    pub const DELETE_ROWS_V1: u8 = 25;
    pub const WRITE_ROWS_V2: u8 = 30;
    pub const UPDATE_ROWS_V2: u8 = 31;
    pub const DELETE_ROWS_V2: u8 = 32;
    pub const PARTIAL_UPDATE_ROWS: u8 = 39;
}

/// Rows event types we apply: (kind) for WRITE/UPDATE/DELETE v1 (MariaDB,
/// MySQL 5.1–5.5) and v2 (MySQL 5.6+). `None` for anything else.
pub fn rows_kind(event_type: u8) -> Option<RowsKind> {
    match event_type {
        23 | 30 => Some(RowsKind::Write),
        24 | 31 => Some(RowsKind::Update),
        25 | 32 => Some(RowsKind::Delete),
        _ => None,
    }
}

/// The table id of a rows event body, without decoding anything else, so
/// events of unwatched tables are skipped for the price of six bytes.
pub fn rows_table_id(body: &[u8]) -> Option<u64> {
    let b = body.get(..6)?;
    Some(
        u64::from(b[0])
            | u64::from(b[1]) << 8
            | u64::from(b[2]) << 16
            | u64::from(b[3]) << 24
            | u64::from(b[4]) << 32
            | u64::from(b[5]) << 40,
    )
}

// ---------------------------------------------------------------------------
// Column plans
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Plan {
    Int {
        width: u8,
        unsigned: bool,
    },
    Year,
    Bit {
        nbytes: u8,
    },
    Float,
    Double,
    Decimal {
        precision: u8,
        scale: u8,
    },
    /// CHAR/BINARY (STRING) and VARCHAR/VARBINARY: `len_bytes` 1 or 2;
    /// `text` None = blob; `pad_to` re-pads BINARY(n) with 0x00.
    Str {
        len_bytes: u8,
        text: Option<Charset>,
        pad_to: usize,
    },
    /// BLOB/TEXT/GEOMETRY/VECTOR (and MariaDB JSON): `len_bytes` 1..=4.
    Blob {
        len_bytes: u8,
        text: Option<Charset>,
    },
    Enum {
        size: u8,
        labels: Vec<String>,
    },
    Set {
        nbytes: u8,
        labels: Vec<String>,
    },
    Json {
        len_bytes: u8,
    },
    Date,
    Datetime2 {
        fsp: u8,
    },
    Timestamp2 {
        fsp: u8,
    },
    Time2 {
        fsp: u8,
    },
    OldTimestamp,
    OldDatetime,
    OldTime,
}

/// How to decode the columns of one TABLE_MAP; built once per table map.
#[derive(Debug)]
pub struct TableCodec {
    plans: Vec<Plan>,
    table: String,
}

/// Wire type of one TABLE_MAP column after resolving STRING's real type.
#[derive(Debug, Clone, Copy)]
struct WireCol<'m> {
    /// Raw type byte from the map.
    raw: u8,
    /// Real type (ENUM/SET/STRING for raw STRING; else raw).
    real: u8,
    meta: &'m [u8],
    /// CHAR length in bytes (STRING only).
    str_len: usize,
}

fn wire_col<'m>(tme: &'m TableMapEvent<'_>, i: usize) -> Result<WireCol<'m>, DecodeError> {
    let raw = match tme.get_raw_column_type(i) {
        Ok(Some(t)) => t as u8,
        Ok(None) => {
            return Err(DecodeError::Malformed(format!("table map has no type for column {i}")));
        }
        Err(e) => return Err(DecodeError::Unsupported(format!("column {i}: {e}"))),
    };
    let meta = tme
        .get_column_metadata(i)
        .ok_or_else(|| DecodeError::Malformed(format!("table map metadata for column {i} is truncated")))?;
    let mut real = raw;
    let mut str_len = 0;
    if raw == ColumnType::MYSQL_TYPE_STRING as u8 {
        let (b0, b1) = (meta.first().copied().unwrap_or(0), meta.get(1).copied().unwrap_or(0));
        if b0 != 0 {
            real = b0 | 0x30;
            if (b0 & 0x30) != 0x30 {
                // long CHAR(): length bits hidden in byte 0 (MySQL bug #37426)
                str_len = usize::from(b1) | ((usize::from(b0 & 0x30) ^ 0x30) << 4);
            } else {
                str_len = usize::from(b1);
            }
        } else {
            str_len = usize::from(u16::from_le_bytes([b0, b1]));
        }
    }
    if raw == ColumnType::MYSQL_TYPE_DATE as u8 {
        real = ColumnType::MYSQL_TYPE_NEWDATE as u8;
    }
    Ok(WireCol { raw, real, meta, str_len })
}

fn meta_byte(w: &WireCol<'_>, i: usize) -> Result<u8, DecodeError> {
    w.meta.get(i).copied().ok_or_else(|| DecodeError::Malformed(format!("column type {} lacks metadata", w.raw)))
}

fn type_name(t: u8) -> String {
    match ColumnType::try_from(t) {
        Ok(ct) => format!("{ct:?}"),
        Err(_) => format!("type {t}"),
    }
}

/// `binary(16)` → 16.
fn paren_len(column_type: &str) -> Option<usize> {
    let open = column_type.find('(')?;
    let close = column_type[open..].find(')')? + open;
    column_type[open + 1..close].trim().parse().ok()
}

fn column_charset(col: &ColumnDef) -> Option<Charset> {
    let blobish =
        matches!(col.data_type.as_str(), "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob");
    match col.charset.as_deref() {
        _ if blobish => None,
        Some(cs) => match Charset::from_mysql_name(cs) {
            Charset::Binary => None,
            other => Some(other),
        },
        None => Some(Charset::Utf8),
    }
}

fn build_plan(w: &WireCol<'_>, col: &ColumnDef) -> Result<Plan, DecodeError> {
    use ColumnType as T;
    let dt = col.data_type.as_str();
    let is = |t: ColumnType| w.real == t as u8;
    let ok = |compatible: bool| {
        if compatible {
            Ok(())
        } else {
            Err(DecodeError::Mismatch(format!(
                "column {} is {} in the schema but {} in the binlog",
                col.name,
                col.column_type,
                type_name(w.real)
            )))
        }
    };
    let int = |width: u8, names: &[&str]| -> Result<Plan, DecodeError> {
        ok(names.contains(&dt))?;
        Ok(Plan::Int { width, unsigned: col.unsigned })
    };
    let plan = if is(T::MYSQL_TYPE_TINY) {
        int(1, &["tinyint", "bool", "boolean"])?
    } else if is(T::MYSQL_TYPE_SHORT) {
        int(2, &["smallint"])?
    } else if is(T::MYSQL_TYPE_INT24) {
        int(3, &["mediumint"])?
    } else if is(T::MYSQL_TYPE_LONG) {
        int(4, &["int", "integer"])?
    } else if is(T::MYSQL_TYPE_LONGLONG) {
        int(8, &["bigint"])?
    } else if is(T::MYSQL_TYPE_YEAR) {
        ok(dt == "year")?;
        Plan::Year
    } else if is(T::MYSQL_TYPE_BIT) {
        ok(dt == "bit")?;
        let bits = usize::from(meta_byte(w, 1)?) * 8 + usize::from(meta_byte(w, 0)?);
        let nbytes = bits.div_ceil(8);
        if nbytes > 8 {
            return Err(DecodeError::Malformed(format!("BIT column {} with {bits} bits", col.name)));
        }
        Plan::Bit { nbytes: nbytes as u8 }
    } else if is(T::MYSQL_TYPE_FLOAT) {
        ok(dt == "float")?;
        Plan::Float
    } else if is(T::MYSQL_TYPE_DOUBLE) {
        ok(matches!(dt, "double" | "real" | "double precision"))?;
        Plan::Double
    } else if is(T::MYSQL_TYPE_NEWDECIMAL) {
        ok(matches!(dt, "decimal" | "numeric" | "fixed" | "dec"))?;
        let (precision, scale) = (meta_byte(w, 0)?, meta_byte(w, 1)?);
        if precision == 0 || precision > 65 || scale > 30 || scale > precision {
            return Err(DecodeError::Malformed(format!("DECIMAL({precision},{scale}) for column {}", col.name)));
        }
        Plan::Decimal { precision, scale }
    } else if is(T::MYSQL_TYPE_STRING) {
        ok(matches!(dt, "char" | "binary"))?;
        let text = column_charset(col);
        let pad_to =
            if text.is_none() && dt == "binary" { paren_len(&col.column_type).unwrap_or(w.str_len) } else { 0 };
        Plan::Str { len_bytes: if w.str_len > 255 { 2 } else { 1 }, text, pad_to }
    } else if is(T::MYSQL_TYPE_VARCHAR) || is(T::MYSQL_TYPE_VAR_STRING) {
        ok(matches!(dt, "varchar" | "varbinary" | "char" | "binary"))?;
        let max = usize::from(u16::from_le_bytes([meta_byte(w, 0)?, meta_byte(w, 1)?]));
        Plan::Str { len_bytes: if max > 255 { 2 } else { 1 }, text: column_charset(col), pad_to: 0 }
    } else if is(T::MYSQL_TYPE_ENUM) {
        ok(dt == "enum")?;
        let size = if w.raw == T::MYSQL_TYPE_STRING as u8 { meta_byte(w, 1)? } else { meta_byte(w, 0)? };
        if size != 1 && size != 2 {
            return Err(DecodeError::Malformed(format!("ENUM column {} of {size} bytes", col.name)));
        }
        Plan::Enum { size, labels: col.labels.clone() }
    } else if is(T::MYSQL_TYPE_SET) {
        ok(dt == "set")?;
        let nbytes = if w.raw == T::MYSQL_TYPE_STRING as u8 { meta_byte(w, 1)? } else { meta_byte(w, 0)? };
        if !(1..=8).contains(&nbytes) {
            return Err(DecodeError::Malformed(format!("SET column {} of {nbytes} bytes", col.name)));
        }
        Plan::Set { nbytes, labels: col.labels.clone() }
    } else if is(T::MYSQL_TYPE_BLOB)
        || is(T::MYSQL_TYPE_TINY_BLOB)
        || is(T::MYSQL_TYPE_MEDIUM_BLOB)
        || is(T::MYSQL_TYPE_LONG_BLOB)
    {
        // MariaDB's JSON is LONGTEXT: passed through as text.
        ok(matches!(
            dt,
            "tinyblob" | "blob" | "mediumblob" | "longblob" | "tinytext" | "text" | "mediumtext" | "longtext" | "json"
        ))?;
        let len_bytes = meta_byte(w, 0)?;
        if !(1..=4).contains(&len_bytes) {
            return Err(DecodeError::Malformed(format!("BLOB column {} with {len_bytes} length bytes", col.name)));
        }
        let text = if dt == "json" { Some(Charset::Utf8) } else { column_charset(col) };
        Plan::Blob { len_bytes, text }
    } else if is(T::MYSQL_TYPE_GEOMETRY) || is(T::MYSQL_TYPE_VECTOR) {
        ok(matches!(
            dt,
            "geometry"
                | "point"
                | "linestring"
                | "polygon"
                | "multipoint"
                | "multilinestring"
                | "multipolygon"
                | "geometrycollection"
                | "geomcollection"
                | "vector"
        ))?;
        let len_bytes = meta_byte(w, 0)?;
        if !(1..=4).contains(&len_bytes) {
            return Err(DecodeError::Malformed(format!("column {} with {len_bytes} length bytes", col.name)));
        }
        Plan::Blob { len_bytes, text: None }
    } else if is(T::MYSQL_TYPE_JSON) {
        ok(dt == "json")?;
        let len_bytes = meta_byte(w, 0)?;
        if !(1..=4).contains(&len_bytes) {
            return Err(DecodeError::Malformed(format!("JSON column {} with {len_bytes} length bytes", col.name)));
        }
        Plan::Json { len_bytes }
    } else if is(T::MYSQL_TYPE_NEWDATE) {
        ok(dt == "date")?;
        Plan::Date
    } else if is(T::MYSQL_TYPE_DATETIME2) {
        ok(dt == "datetime")?;
        Plan::Datetime2 { fsp: meta_byte(w, 0)?.min(6) }
    } else if is(T::MYSQL_TYPE_TIMESTAMP2) {
        ok(dt == "timestamp")?;
        Plan::Timestamp2 { fsp: meta_byte(w, 0)?.min(6) }
    } else if is(T::MYSQL_TYPE_TIME2) {
        ok(dt == "time")?;
        Plan::Time2 { fsp: meta_byte(w, 0)?.min(6) }
    } else if is(T::MYSQL_TYPE_TIMESTAMP) {
        ok(dt == "timestamp")?;
        Plan::OldTimestamp
    } else if is(T::MYSQL_TYPE_DATETIME) {
        ok(dt == "datetime")?;
        Plan::OldDatetime
    } else if is(T::MYSQL_TYPE_TIME) {
        ok(dt == "time")?;
        Plan::OldTime
    } else {
        return Err(DecodeError::Unsupported(format!(
            "column {} ({}) has binlog type {}",
            col.name,
            col.column_type,
            type_name(w.real)
        )));
    };
    Ok(plan)
}

impl TableCodec {
    /// Checks the table map against `schema` (column count, compatible wire
    /// types, names when the map carries them) and prepares decoding.
    pub fn new(tme: &TableMapEvent<'_>, schema: &TableSchema) -> Result<TableCodec, DecodeError> {
        let n = tme.columns_count() as usize;
        if n != schema.columns.len() {
            return Err(DecodeError::Mismatch(format!(
                "{} has {} columns in the schema but {n} in the binlog",
                schema.table,
                schema.columns.len()
            )));
        }
        let extractor = OptionalMetaExtractor::new(tme.iter_optional_meta())
            .map_err(|e| DecodeError::Malformed(format!("table map optional metadata: {e}")))?;
        for (i, name) in extractor.iter_column_name().enumerate() {
            let name = name.map_err(|e| DecodeError::Malformed(format!("table map column names: {e}")))?;
            let Some(col) = schema.columns.get(i) else {
                break;
            };
            let name = name.name();
            if !col.name.eq_ignore_ascii_case(&name) {
                return Err(DecodeError::Mismatch(format!(
                    "column {} of {} is named {} in the schema but {name} in the binlog",
                    i + 1,
                    schema.table,
                    col.name
                )));
            }
        }
        let mut plans = Vec::with_capacity(n);
        for (i, col) in schema.columns.iter().enumerate() {
            let w = wire_col(tme, i)?;
            plans.push(build_plan(&w, col)?);
        }
        Ok(TableCodec { plans, table: schema.table.to_string() })
    }

    pub fn column_count(&self) -> usize {
        self.plans.len()
    }
}

// ---------------------------------------------------------------------------
// Schema from FULL metadata
// ---------------------------------------------------------------------------

fn quote_labels(kind: &str, labels: &[String]) -> String {
    let mut s = String::from(kind);
    s.push('(');
    for (i, l) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('\'');
        s.push_str(&l.replace('\'', "''"));
        s.push('\'');
    }
    s.push(')');
    s
}

/// The schema a TABLE_MAP describes when it carries FULL metadata (column
/// names, signedness, charsets, ENUM/SET labels); `None` otherwise.
pub fn schema_from_table_map(tme: &TableMapEvent<'_>, table: TableRef) -> Option<TableSchema> {
    use ColumnType as T;
    let n = tme.columns_count() as usize;
    let ex = OptionalMetaExtractor::new(tme.iter_optional_meta()).ok()?;
    let names: Vec<String> =
        ex.iter_column_name().map(|r| r.map(|c| c.name().into_owned())).collect::<Result<_, _>>().ok()?;
    if names.len() != n {
        return None;
    }
    let mut enum_labels: Vec<Vec<String>> = Vec::new();
    let mut set_labels: Vec<Vec<String>> = Vec::new();
    for field in tme.iter_optional_meta() {
        match field.ok()? {
            OptionalMetadataField::EnumStrValue(v) => {
                for e in v.iter_values() {
                    let e = e.ok()?;
                    enum_labels.push(e.values().iter().map(|x| x.value().into_owned()).collect());
                }
            }
            OptionalMetadataField::SetStrValue(v) => {
                for e in v.iter_values() {
                    let e = e.ok()?;
                    set_labels.push(e.values().iter().map(|x| x.value().into_owned()).collect());
                }
            }
            _ => {}
        }
    }
    let mut signedness = ex.iter_signedness();
    let mut charsets = ex.iter_charset();
    let mut enum_set_charsets = ex.iter_enum_and_set_charset();
    let (mut enum_i, mut set_i) = (0, 0);
    let nullable = tme.null_bitmask();
    let mut columns = Vec::with_capacity(n);
    for (i, name) in names.into_iter().enumerate() {
        let w = wire_col(tme, i).ok()?;
        let raw_numeric = ColumnType::try_from(w.raw).map(|t| t.is_numeric_type()).unwrap_or(false);
        let unsigned = if raw_numeric { signedness.next().unwrap_or(false) } else { false };
        let is_char = [T::MYSQL_TYPE_STRING, T::MYSQL_TYPE_VARCHAR, T::MYSQL_TYPE_VAR_STRING, T::MYSQL_TYPE_BLOB]
            .iter()
            .any(|t| w.real == *t as u8)
            || [T::MYSQL_TYPE_TINY_BLOB, T::MYSQL_TYPE_MEDIUM_BLOB, T::MYSQL_TYPE_LONG_BLOB]
                .iter()
                .any(|t| w.real == *t as u8);
        let is_enum_set = w.real == T::MYSQL_TYPE_ENUM as u8 || w.real == T::MYSQL_TYPE_SET as u8;
        let collation = if is_char {
            charsets.next().and_then(|r| r.ok())
        } else if is_enum_set {
            enum_set_charsets.next().and_then(|r| r.ok())
        } else {
            None
        };
        let charset = collation.map(|c| Collation::resolve(CollationId::from(c)).charset().to_owned());
        let binary = charset.as_deref() == Some("binary");
        let uns = if unsigned { " unsigned" } else { "" };
        let mut labels = Vec::new();
        let (mut precision, mut scale, mut dtp) = (None, None, None);
        let (data_type, column_type): (&str, String) = match ColumnType::try_from(w.real).ok()? {
            T::MYSQL_TYPE_TINY => ("tinyint", format!("tinyint{uns}")),
            T::MYSQL_TYPE_SHORT => ("smallint", format!("smallint{uns}")),
            T::MYSQL_TYPE_INT24 => ("mediumint", format!("mediumint{uns}")),
            T::MYSQL_TYPE_LONG => ("int", format!("int{uns}")),
            T::MYSQL_TYPE_LONGLONG => ("bigint", format!("bigint{uns}")),
            T::MYSQL_TYPE_FLOAT => ("float", format!("float{uns}")),
            T::MYSQL_TYPE_DOUBLE => ("double", format!("double{uns}")),
            T::MYSQL_TYPE_YEAR => ("year", "year".into()),
            T::MYSQL_TYPE_BIT => {
                let bits = u32::from(*w.meta.get(1)?) * 8 + u32::from(*w.meta.first()?);
                precision = Some(bits);
                ("bit", format!("bit({bits})"))
            }
            T::MYSQL_TYPE_NEWDECIMAL => {
                let (p, s) = (*w.meta.first()?, *w.meta.get(1)?);
                precision = Some(u32::from(p));
                scale = Some(u32::from(s));
                ("decimal", format!("decimal({p},{s}){uns}"))
            }
            T::MYSQL_TYPE_STRING => {
                if binary {
                    ("binary", format!("binary({})", w.str_len))
                } else {
                    ("char", "char".into())
                }
            }
            T::MYSQL_TYPE_VARCHAR | T::MYSQL_TYPE_VAR_STRING => {
                if binary {
                    ("varbinary", "varbinary".into())
                } else {
                    ("varchar", "varchar".into())
                }
            }
            T::MYSQL_TYPE_BLOB | T::MYSQL_TYPE_TINY_BLOB | T::MYSQL_TYPE_MEDIUM_BLOB | T::MYSQL_TYPE_LONG_BLOB => {
                let dt = match (*w.meta.first()?, binary) {
                    (1, true) => "tinyblob",
                    (2, true) => "blob",
                    (3, true) => "mediumblob",
                    (_, true) => "longblob",
                    (1, false) => "tinytext",
                    (2, false) => "text",
                    (3, false) => "mediumtext",
                    (_, false) => "longtext",
                };
                (dt, dt.into())
            }
            T::MYSQL_TYPE_ENUM => {
                labels = enum_labels.get(enum_i).cloned().unwrap_or_default();
                enum_i += 1;
                ("enum", quote_labels("enum", &labels))
            }
            T::MYSQL_TYPE_SET => {
                labels = set_labels.get(set_i).cloned().unwrap_or_default();
                set_i += 1;
                ("set", quote_labels("set", &labels))
            }
            T::MYSQL_TYPE_JSON => ("json", "json".into()),
            T::MYSQL_TYPE_GEOMETRY => ("geometry", "geometry".into()),
            T::MYSQL_TYPE_VECTOR => ("vector", "vector".into()),
            T::MYSQL_TYPE_NEWDATE | T::MYSQL_TYPE_DATE => ("date", "date".into()),
            T::MYSQL_TYPE_DATETIME2 => {
                dtp = Some(u32::from(*w.meta.first()?));
                ("datetime", "datetime".into())
            }
            T::MYSQL_TYPE_TIMESTAMP2 => {
                dtp = Some(u32::from(*w.meta.first()?));
                ("timestamp", "timestamp".into())
            }
            T::MYSQL_TYPE_TIME2 => {
                dtp = Some(u32::from(*w.meta.first()?));
                ("time", "time".into())
            }
            T::MYSQL_TYPE_DATETIME => ("datetime", "datetime".into()),
            T::MYSQL_TYPE_TIMESTAMP => ("timestamp", "timestamp".into()),
            T::MYSQL_TYPE_TIME => ("time", "time".into()),
            _ => return None,
        };
        columns.push(ColumnDef {
            name,
            data_type: data_type.into(),
            column_type,
            unsigned,
            charset,
            numeric_precision: precision,
            numeric_scale: scale,
            datetime_precision: dtp,
            labels,
            nullable: nullable.get(i).map(|b| *b).unwrap_or(true),
        });
    }
    let primary_key = ex.iter_primary_key().map(|r| r.map(|x| x as usize)).collect::<Result<Vec<_>, _>>().ok()?;
    if primary_key.iter().any(|&i| i >= n) {
        return None;
    }
    Some(TableSchema { table, columns, primary_key })
}

// ---------------------------------------------------------------------------
// Row decoding
// ---------------------------------------------------------------------------

/// A decoded value before it is turned into a `ValueRef` (offsets, so the
/// scratch buffer may grow while a row is decoded).
#[derive(Debug, Clone, Copy)]
enum Slot {
    Null,
    Int(i64),
    Real(f64),
    EvText(usize, usize),
    EvBlob(usize, usize),
    ScText(usize, usize),
    ScBlob(usize, usize),
}

#[derive(Debug, Default)]
pub struct RowDecoder {
    scratch: Vec<u8>,
    slots: Vec<Slot>,
    /// Recycled storage for the `ValueRef`s handed to the callback.
    values: Vec<ValueRef<'static>>,
}

/// Re-types an emptied vector so its allocation can be reused with another
/// lifetime (the in-place `collect` keeps the buffer).
fn recycle<'a, 'b>(mut v: Vec<ValueRef<'a>>) -> Vec<ValueRef<'b>> {
    v.clear();
    v.into_iter().map(|_| ValueRef::Null).collect()
}

fn malformed(what: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(what.to_string())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
                malformed(format_args!("needs {n} bytes at offset {} of {}", self.pos, self.buf.len()))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    #[inline]
    fn uint_le(&mut self, n: usize) -> Result<u64, DecodeError> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }
    #[inline]
    fn uint_be(&mut self, n: usize) -> Result<u64, DecodeError> {
        let b = self.take(n)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }
    fn lenenc(&mut self) -> Result<u64, DecodeError> {
        let first = self.take(1)?[0];
        match first {
            0..=0xfa => Ok(u64::from(first)),
            0xfc => self.uint_le(2),
            0xfd => self.uint_le(3),
            0xfe => self.uint_le(8),
            _ => Err(malformed("bad length-encoded integer")),
        }
    }
}

impl RowDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes every row of one rows event (`Event::data()`, the body after
    /// the common header, without checksum) and hands each change to `f`.
    pub fn decode(
        &mut self,
        event_type: u8,
        body: &[u8],
        codec: &TableCodec,
        f: &mut dyn FnMut(RowChange<'_>) -> Result<(), crate::Error>,
    ) -> Result<(), DecodeFailure> {
        let Some(kind) = rows_kind(event_type) else {
            return Err(DecodeError::Unsupported(if event_type == event_type::PARTIAL_UPDATE_ROWS {
                "PARTIAL_UPDATE_ROWS_EVENT (binlog_row_value_options=PARTIAL_JSON); unset binlog_row_value_options"
                    .into()
            } else {
                format!("event type {event_type} is not a rows event")
            })
            .into());
        };
        let mut r = Reader { buf: body, pos: 0 };
        r.take(8)?; // table id + flags
        if event_type >= event_type::WRITE_ROWS_V2 {
            let extra = r.uint_le(2)? as usize;
            r.take(extra.checked_sub(2).ok_or_else(|| malformed("extra-data length below 2"))?)?;
        }
        let ncols = r.lenenc()?;
        let n = codec.plans.len();
        if ncols != n as u64 {
            return Err(DecodeError::Mismatch(format!(
                "rows event for {} has {ncols} columns, table map {n}",
                codec.table
            ))
            .into());
        }
        let bitmap_len = n.div_ceil(8);
        let images = if kind == RowsKind::Update { 2 } else { 1 };
        for img in 0..images {
            let bm = r.take(bitmap_len)?;
            if let Some(missing) = (0..n).find(|&i| bm[i / 8] & (1 << (i % 8)) == 0) {
                return Err(DecodeError::PartialImage(format!(
                    "column {} of {} missing from the {} image",
                    missing + 1,
                    codec.table,
                    if kind == RowsKind::Write || img == 1 { "after" } else { "before" }
                ))
                .into());
            }
        }

        while r.pos < body.len() {
            self.scratch.clear();
            self.slots.clear();
            for _ in 0..images {
                decode_image(&mut r, codec, &mut self.scratch, &mut self.slots)?;
            }
            let mut values: Vec<ValueRef<'_>> = recycle(std::mem::take(&mut self.values));
            let scratch: &[u8] = &self.scratch;
            values.extend(self.slots.iter().map(|s| match *s {
                Slot::Null => ValueRef::Null,
                Slot::Int(i) => ValueRef::Integer(i),
                Slot::Real(x) => ValueRef::Real(x),
                Slot::EvText(a, b) => ValueRef::Text(&body[a..b]),
                Slot::EvBlob(a, b) => ValueRef::Blob(&body[a..b]),
                Slot::ScText(a, b) => ValueRef::Text(&scratch[a..b]),
                Slot::ScBlob(a, b) => ValueRef::Blob(&scratch[a..b]),
            }));
            let change = match kind {
                RowsKind::Write => RowChange::Insert(&values),
                RowsKind::Delete => RowChange::Delete(&values),
                RowsKind::Update => {
                    let (before, after) = values.split_at(n);
                    RowChange::Update { before, after }
                }
            };
            let res = f(change);
            self.values = recycle(values);
            res.map_err(DecodeFailure::Callback)?;
        }
        Ok(())
    }
}

fn decode_image(
    r: &mut Reader<'_>,
    codec: &TableCodec,
    scratch: &mut Vec<u8>,
    slots: &mut Vec<Slot>,
) -> Result<(), DecodeError> {
    let n = codec.plans.len();
    let nulls = r.take(n.div_ceil(8))?;
    for (i, plan) in codec.plans.iter().enumerate() {
        if nulls[i / 8] & (1 << (i % 8)) != 0 {
            slots.push(Slot::Null);
            continue;
        }
        let slot = decode_value(plan, r, scratch).map_err(|e| match e {
            DecodeError::Malformed(m) => DecodeError::Malformed(format!("{} column {}: {m}", codec.table, i + 1)),
            other => other,
        })?;
        slots.push(slot);
    }
    Ok(())
}

/// Appends `bytes` decoded from `cs` as a text slot (borrowing the event
/// when they already are valid UTF-8).
fn text_slot(cs: Charset, start: usize, bytes: &[u8], scratch: &mut Vec<u8>) -> Slot {
    let s0 = scratch.len();
    if charset::decode_to_utf8(cs, bytes, scratch) {
        Slot::EvText(start, start + bytes.len())
    } else {
        Slot::ScText(s0, scratch.len())
    }
}

fn decode_value(plan: &Plan, r: &mut Reader<'_>, scratch: &mut Vec<u8>) -> Result<Slot, DecodeError> {
    let s0 = scratch.len();
    let sc_text = |scratch: &Vec<u8>| Slot::ScText(s0, scratch.len());
    // The replica's contract: unsigned values above i64::MAX as decimal text.
    let big_unsigned = |v: u64, scratch: &mut Vec<u8>| {
        if v > i64::MAX as u64 {
            let _ = write!(scratch, "{v}");
            sc_text(scratch)
        } else {
            Slot::Int(v as i64)
        }
    };
    Ok(match plan {
        Plan::Int { width, unsigned } => {
            let w = usize::from(*width);
            let v = r.uint_le(w)?;
            if *unsigned {
                big_unsigned(v, scratch)
            } else {
                let shift = 64 - 8 * w as u32;
                Slot::Int(((v << shift) as i64) >> shift)
            }
        }
        Plan::Year => {
            let b = r.take(1)?[0];
            Slot::Int(if b == 0 { 0 } else { 1900 + i64::from(b) })
        }
        Plan::Bit { nbytes } => big_unsigned(r.uint_be(usize::from(*nbytes))?, scratch),
        Plan::Float => {
            let b = r.take(4)?;
            Slot::Real(float_to_f64(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
        Plan::Double => Slot::Real(f64::from_bits(r.uint_le(8)?)),
        Plan::Decimal { precision, scale } => {
            let size = decimal_bin_size(*precision, *scale);
            let bin = r.take(size)?;
            format_decimal_bin(bin, *precision, *scale, scratch).ok_or_else(|| malformed("bad DECIMAL digits"))?;
            sc_text(scratch)
        }
        Plan::Str { len_bytes, text, pad_to } => {
            let len = r.uint_le(usize::from(*len_bytes))? as usize;
            let start = r.pos;
            let bytes = r.take(len)?;
            match text {
                Some(cs) => text_slot(*cs, start, bytes, scratch),
                None if *pad_to > len => {
                    scratch.extend_from_slice(bytes);
                    scratch.resize(s0 + pad_to, 0);
                    Slot::ScBlob(s0, scratch.len())
                }
                None => Slot::EvBlob(start, start + len),
            }
        }
        Plan::Blob { len_bytes, text } => {
            let len = r.uint_le(usize::from(*len_bytes))? as usize;
            let start = r.pos;
            let bytes = r.take(len)?;
            match text {
                Some(cs) => text_slot(*cs, start, bytes, scratch),
                None => Slot::EvBlob(start, start + len),
            }
        }
        Plan::Enum { size, labels } => {
            let idx = r.uint_le(usize::from(*size))? as usize;
            if idx == 0 {
                Slot::ScText(s0, s0)
            } else {
                match labels.get(idx - 1) {
                    Some(l) => scratch.extend_from_slice(l.as_bytes()),
                    None => {
                        let _ = write!(scratch, "{idx}");
                    }
                }
                sc_text(scratch)
            }
        }
        Plan::Set { nbytes, labels } => {
            let mask = r.uint_le(usize::from(*nbytes))?;
            format_set(mask, labels, scratch);
            sc_text(scratch)
        }
        Plan::Json { len_bytes } => {
            let len = r.uint_le(usize::from(*len_bytes))? as usize;
            let bytes = r.take(len)?;
            if bytes.is_empty() {
                scratch.extend_from_slice(b"null");
            } else {
                format_json(bytes, scratch).map_err(|e| malformed(format_args!("JSON: {e}")))?;
            }
            sc_text(scratch)
        }
        Plan::Date => {
            let v = r.uint_le(3)?;
            format_date(scratch, (v >> 9) as u32, ((v >> 5) & 15) as u32, (v & 31) as u32);
            sc_text(scratch)
        }
        Plan::Datetime2 { fsp } => {
            let int = r.uint_be(5)? as i64 - 0x80_0000_0000;
            let frac = read_frac(r, *fsp)?;
            let int = int.unsigned_abs();
            let ymd = int >> 17;
            let ym = ymd >> 5;
            let hms = int & 0x1ffff;
            format_datetime(
                scratch,
                (ym / 13) as u32,
                (ym % 13) as u32,
                (ymd & 31) as u32,
                (hms >> 12) as u32,
                ((hms >> 6) & 63) as u32,
                (hms & 63) as u32,
                frac.unsigned_abs(),
                *fsp,
            );
            sc_text(scratch)
        }
        Plan::Timestamp2 { fsp } => {
            let secs = r.uint_be(4)?;
            let frac = read_frac(r, *fsp)?;
            format_timestamp_utc(scratch, secs as i64, frac.unsigned_abs(), *fsp);
            sc_text(scratch)
        }
        Plan::Time2 { fsp } => {
            let packed = read_time2_packed(r, *fsp)?;
            format_time_packed(scratch, packed, *fsp);
            sc_text(scratch)
        }
        Plan::OldTimestamp => {
            let secs = r.uint_le(4)?;
            format_timestamp_utc(scratch, secs as i64, 0, 0);
            sc_text(scratch)
        }
        Plan::OldDatetime => {
            let v = r.uint_le(8)?;
            let (d, t) = (v / 1_000_000, v % 1_000_000);
            format_datetime(
                scratch,
                (d / 10000) as u32,
                ((d / 100) % 100) as u32,
                (d % 100) as u32,
                (t / 10000) as u32,
                ((t / 100) % 100) as u32,
                (t % 100) as u32,
                0,
                0,
            );
            sc_text(scratch)
        }
        Plan::OldTime => {
            let v = r.uint_le(3)?;
            let v = ((v << 40) as i64) >> 40;
            let (neg, a) = (v < 0, v.unsigned_abs());
            format_time(scratch, neg, (a / 10000) as u32, ((a / 100) % 100) as u32, (a % 100) as u32, 0, 0);
            sc_text(scratch)
        }
    })
}

/// Fractional part of DATETIME2/TIMESTAMP2, in microseconds.
fn read_frac(r: &mut Reader<'_>, fsp: u8) -> Result<i64, DecodeError> {
    Ok(match fsp {
        1 | 2 => i64::from(r.take(1)?[0] as i8) * 10_000,
        3 | 4 => {
            let b = r.take(2)?;
            i64::from(i16::from_be_bytes([b[0], b[1]])) * 100
        }
        5 | 6 => {
            let v = r.uint_be(3)?;
            ((v << 40) as i64) >> 40
        }
        _ => 0,
    })
}

/// TIME2 as MySQL's packed longlong (int part << 24 | microseconds, signed).
fn read_time2_packed(r: &mut Reader<'_>, fsp: u8) -> Result<i64, DecodeError> {
    const TIMEF_INT_OFS: i64 = 0x80_0000;
    const TIMEF_OFS: i64 = 0x8000_0000_0000;
    Ok(match fsp {
        1 | 2 => {
            let mut int = r.uint_be(3)? as i64 - TIMEF_INT_OFS;
            let mut frac = i64::from(r.take(1)?[0]);
            if int < 0 && frac > 0 {
                int += 1;
                frac -= 0x100;
            }
            (int << 24) + frac * 10_000
        }
        3 | 4 => {
            let mut int = r.uint_be(3)? as i64 - TIMEF_INT_OFS;
            let mut frac = r.uint_be(2)? as i64;
            if int < 0 && frac > 0 {
                int += 1;
                frac -= 0x10000;
            }
            (int << 24) + frac * 100
        }
        5 | 6 => r.uint_be(6)? as i64 - TIMEF_OFS,
        _ => (r.uint_be(3)? as i64 - TIMEF_INT_OFS) << 24,
    })
}

// ---------------------------------------------------------------------------
// Formatting (public: the snapshot path must produce identical strings)
// ---------------------------------------------------------------------------

/// FLOAT → f64 through the f32's shortest round-trip decimal form, so
/// FLOAT 3.14 becomes 3.14 (not 3.140000104904175). Does not allocate.
pub fn float_to_f64(f: f32) -> f64 {
    if !f.is_finite() {
        return f64::from(f);
    }
    let mut buf = StackBuf::<64>::new();
    if std::fmt::Write::write_fmt(&mut buf, format_args!("{f:e}")).is_err() {
        return f64::from(f);
    }
    buf.as_str().parse::<f64>().unwrap_or(f64::from(f))
}

struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    fn new() -> Self {
        StackBuf { buf: [0; N], len: 0 }
    }
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> std::fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > N {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn push_num(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = 20;
    let mut v = v;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for _ in (20 - i)..width {
        out.push(b'0');
    }
    out.extend_from_slice(&digits[i..]);
}

/// `YYYY-MM-DD` (zero date `0000-00-00`).
pub fn format_date(out: &mut Vec<u8>, year: u32, month: u32, day: u32) {
    push_num(out, u64::from(year), 4);
    out.push(b'-');
    push_num(out, u64::from(month), 2);
    out.push(b'-');
    push_num(out, u64::from(day), 2);
}

fn push_frac(out: &mut Vec<u8>, micros: u64, fsp: u8) {
    if fsp == 0 {
        return;
    }
    let fsp = fsp.min(6) as usize;
    let mut digits = [b'0'; 6];
    let mut v = micros % 1_000_000;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.push(b'.');
    out.extend_from_slice(&digits[..fsp]);
}

/// `YYYY-MM-DD HH:MM:SS` plus exactly `fsp` fractional digits of `micros`.
#[allow(clippy::too_many_arguments)]
pub fn format_datetime(
    out: &mut Vec<u8>,
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u64,
    fsp: u8,
) {
    format_date(out, year, month, day);
    out.push(b' ');
    push_num(out, u64::from(hour), 2);
    out.push(b':');
    push_num(out, u64::from(minute), 2);
    out.push(b':');
    push_num(out, u64::from(second), 2);
    push_frac(out, micros, fsp);
}

/// A TIME in MySQL's packed form (`hms << 24 | micros`, hms = h:10 m:6 s:6,
/// negated as a whole), as `format_time` prints it.
fn format_time_packed(out: &mut Vec<u8>, packed: i64, fsp: u8) {
    let t = packed.unsigned_abs();
    let hms = t >> 24;
    let micros = (t % (1 << 24)) as u32;
    format_time(out, packed < 0, ((hms >> 12) % 1024) as u32, ((hms >> 6) % 64) as u32, (hms % 64) as u32, micros, fsp);
}

/// `[-]HH:MM:SS[.fff]`; hours may exceed 24 (up to 838).
pub fn format_time(out: &mut Vec<u8>, negative: bool, hours: u32, minute: u32, second: u32, micros: u32, fsp: u8) {
    if negative {
        out.push(b'-');
    }
    push_num(out, u64::from(hours), 2);
    out.push(b':');
    push_num(out, u64::from(minute), 2);
    out.push(b':');
    push_num(out, u64::from(second), 2);
    push_frac(out, u64::from(micros), fsp);
}

/// Seconds since the epoch (TIMESTAMP) as a UTC datetime string; 0 is the
/// zero timestamp `0000-00-00 00:00:00`.
pub fn format_timestamp_utc(out: &mut Vec<u8>, secs: i64, micros: u64, fsp: u8) {
    if secs == 0 {
        format_datetime(out, 0, 0, 0, 0, 0, 0, micros, fsp);
        return;
    }
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format_datetime(out, y as u32, m, d, (rem / 3600) as u32, ((rem / 60) % 60) as u32, (rem % 60) as u32, micros, fsp);
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends the comma-joined labels of the bits set in `mask`, in
/// declaration order.
pub fn format_set(mask: u64, labels: &[String], out: &mut Vec<u8>) {
    let mut first = true;
    for (i, l) in labels.iter().enumerate().take(64) {
        if mask & (1 << i) != 0 {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(l.as_bytes());
        }
    }
}

const DIG2BYTES: [usize; 10] = [0, 1, 1, 2, 2, 3, 3, 4, 4, 4];

/// Bytes of MySQL's binary DECIMAL(precision, scale).
pub fn decimal_bin_size(precision: u8, scale: u8) -> usize {
    let intg = usize::from(precision.saturating_sub(scale));
    let scale = usize::from(scale);
    (intg / 9) * 4 + DIG2BYTES[intg % 9] + (scale / 9) * 4 + DIG2BYTES[scale % 9]
}

/// Appends MySQL's text of a binary DECIMAL(precision, scale): `12.50`,
/// `-0.01`, `0.00`, `100`. `None` on malformed input (nothing appended).
pub fn format_decimal_bin(bin: &[u8], precision: u8, scale: u8, out: &mut Vec<u8>) -> Option<()> {
    let size = decimal_bin_size(precision, scale);
    if bin.len() != size || size == 0 || size > 40 {
        return None;
    }
    let mut b = [0u8; 40];
    b[..size].copy_from_slice(bin);
    let negative = b[0] & 0x80 == 0;
    b[0] ^= 0x80;
    if negative {
        for x in &mut b[..size] {
            *x = !*x;
        }
    }
    let intg = usize::from(precision - scale);
    let sc = usize::from(scale);
    // digits, at most 65 + 30
    let mut digits = [0u8; 100];
    let mut nd = 0;
    let mut pos = 0;
    let mut group = |nbytes: usize, ndigits: usize, digits: &mut [u8; 100], nd: &mut usize| -> Option<()> {
        let mut v: u32 = 0;
        for &x in &b[pos..pos + nbytes] {
            v = (v << 8) | u32::from(x);
        }
        pos += nbytes;
        if ndigits < 9 && v >= 10u32.pow(ndigits as u32) || v > 999_999_999 {
            return None;
        }
        for k in (0..ndigits).rev() {
            digits[*nd + k] = (v % 10) as u8;
            v /= 10;
        }
        *nd += ndigits;
        Some(())
    };
    if intg % 9 > 0 {
        group(DIG2BYTES[intg % 9], intg % 9, &mut digits, &mut nd)?;
    }
    for _ in 0..intg / 9 {
        group(4, 9, &mut digits, &mut nd)?;
    }
    let int_digits = nd;
    for _ in 0..sc / 9 {
        group(4, 9, &mut digits, &mut nd)?;
    }
    if sc % 9 > 0 {
        group(DIG2BYTES[sc % 9], sc % 9, &mut digits, &mut nd)?;
    }
    let all_zero = digits[..nd].iter().all(|&d| d == 0);
    if negative && !all_zero {
        out.push(b'-');
    }
    let first = digits[..int_digits].iter().position(|&d| d != 0).unwrap_or(int_digits);
    if first == int_digits {
        out.push(b'0');
    } else {
        out.extend(digits[first..int_digits].iter().map(|d| b'0' + d));
    }
    if sc > 0 {
        out.push(b'.');
        out.extend(digits[int_digits..nd].iter().map(|d| b'0' + d));
    }
    Some(())
}

// ---------------------------------------------------------------------------
// JSON (MySQL binary JSONB → text as MySQL's SELECT prints it)
// ---------------------------------------------------------------------------

/// Appends the MySQL text form of a binary JSON value (`{"a": 1, "b": [1, 2]}`).
/// On error `out` may hold a partial value.
pub fn format_json(jsonb: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let (&t, data) = jsonb.split_first().ok_or("empty JSON value")?;
    json_value(t, data, 0, out)
}

const JSON_MAX_DEPTH: usize = 150;

fn json_err(what: &str) -> String {
    what.to_owned()
}

fn rd(data: &[u8], at: usize, n: usize) -> Result<u64, String> {
    let b = data.get(at..at + n).ok_or_else(|| json_err("truncated JSON"))?;
    Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

fn json_value(t: u8, data: &[u8], depth: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if depth > JSON_MAX_DEPTH {
        return Err(json_err("JSON nested too deeply"));
    }
    match t {
        0x00 => json_container(data, false, true, depth, out),
        0x01 => json_container(data, true, true, depth, out),
        0x02 => json_container(data, false, false, depth, out),
        0x03 => json_container(data, true, false, depth, out),
        0x04 => {
            match data.first() {
                Some(0) => out.extend_from_slice(b"null"),
                Some(1) => out.extend_from_slice(b"true"),
                Some(2) => out.extend_from_slice(b"false"),
                _ => return Err(json_err("bad JSON literal")),
            }
            Ok(())
        }
        0x05 => push_i64(out, rd(data, 0, 2)? as u16 as i16 as i64),
        0x06 => push_i64(out, rd(data, 0, 2)? as i64),
        0x07 => push_i64(out, rd(data, 0, 4)? as u32 as i32 as i64),
        0x08 => push_i64(out, rd(data, 0, 4)? as i64),
        0x09 => push_i64(out, rd(data, 0, 8)? as i64),
        0x0a => {
            let _ = write!(out, "{}", rd(data, 0, 8)?);
            Ok(())
        }
        0x0b => {
            format_json_double(f64::from_bits(rd(data, 0, 8)?), out);
            Ok(())
        }
        0x0c => {
            let (len, hdr) = read_varlen(data)?;
            let s = data.get(hdr..hdr + len).ok_or_else(|| json_err("truncated JSON string"))?;
            json_string(s, out);
            Ok(())
        }
        0x0f => {
            let &ft = data.first().ok_or_else(|| json_err("truncated JSON opaque"))?;
            let (len, hdr) = read_varlen(&data[1..])?;
            let v = data.get(1 + hdr..1 + hdr + len).ok_or_else(|| json_err("truncated JSON opaque"))?;
            json_opaque(ft, v, out)
        }
        _ => Err(format!("unknown JSON type {t}")),
    }
}

fn push_i64(out: &mut Vec<u8>, v: i64) -> Result<(), String> {
    let _ = write!(out, "{v}");
    Ok(())
}

fn read_varlen(data: &[u8]) -> Result<(usize, usize), String> {
    let mut len: usize = 0;
    for i in 0..5 {
        let &b = data.get(i).ok_or_else(|| json_err("truncated JSON length"))?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((len, i + 1));
        }
    }
    Err(json_err("bad JSON length"))
}

fn json_container(data: &[u8], large: bool, object: bool, depth: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let w = if large { 4 } else { 2 };
    let count = rd(data, 0, w)? as usize;
    let size = rd(data, w, w)? as usize;
    if size > data.len() {
        return Err(json_err("JSON container larger than its value"));
    }
    let data = &data[..size];
    let key_entry = if large { 6 } else { 4 };
    let value_entry = if large { 5 } else { 3 };
    let keys_at = 2 * w;
    let values_at = keys_at + if object { count.checked_mul(key_entry).ok_or("bad JSON")? } else { 0 };
    if values_at + count.checked_mul(value_entry).ok_or("bad JSON")? > size {
        return Err(json_err("JSON container header overflows"));
    }
    out.push(if object { b'{' } else { b'[' });
    for i in 0..count {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        if object {
            let ke = keys_at + i * key_entry;
            let koff = rd(data, ke, w)? as usize;
            let klen = rd(data, ke + w, 2)? as usize;
            let key = data.get(koff..koff + klen).ok_or_else(|| json_err("JSON key out of range"))?;
            json_string(key, out);
            out.extend_from_slice(b": ");
        }
        let ve = values_at + i * value_entry;
        let vt = data[ve];
        let inline = matches!(vt, 0x04..=0x06) || (large && matches!(vt, 0x07 | 0x08));
        if inline {
            json_value(vt, &data[ve + 1..ve + 1 + w], depth + 1, out)?;
        } else {
            let off = rd(data, ve + 1, w)? as usize;
            let v = data.get(off..).ok_or_else(|| json_err("JSON value out of range"))?;
            json_value(vt, v, depth + 1, out)?;
        }
    }
    out.push(if object { b'}' } else { b']' });
    Ok(())
}

/// JSON string escaping as MySQL does it (`"`, `\`, control characters).
pub fn json_string(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let s = String::from_utf8_lossy(s);
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// A double as MySQL's JSON printing does it (`my_gcvt` with the widest
/// field, then `.0` when neither a point nor an exponent was printed).
pub fn format_json_double(d: f64, out: &mut Vec<u8>) {
    if !d.is_finite() {
        let _ = write!(out, "{d}");
        return;
    }
    if d == 0.0 {
        out.extend_from_slice(if d.is_sign_negative() { b"-0.0" } else { b"0.0" });
        return;
    }
    // Shortest round-trip digits and exponent, from Rust's `{:e}`.
    let mut buf = StackBuf::<64>::new();
    let _ = std::fmt::Write::write_fmt(&mut buf, format_args!("{:e}", d.abs()));
    let s = buf.as_str();
    let (mant, exp) = s.split_once('e').unwrap_or((s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let mut digits = [0u8; 32];
    let mut len = 0;
    for b in mant.bytes().filter(u8::is_ascii_digit) {
        if len < digits.len() {
            digits[len] = b;
            len += 1;
        }
    }
    let digits = &digits[..len];
    let decpt = exp + 1; // value = 0.DIGITS × 10^decpt
    let len = len as i32;
    if d < 0.0 {
        out.push(b'-');
    }
    const MAX_DECPT_FOR_F_FORMAT: i32 = 15;
    let f_format = decpt > -MAX_DECPT_FOR_F_FORMAT && (decpt <= MAX_DECPT_FOR_F_FORMAT || len > decpt);
    if f_format {
        if decpt <= 0 {
            out.extend_from_slice(b"0.");
            for _ in 0..-decpt {
                out.push(b'0');
            }
            out.extend_from_slice(digits);
        } else if decpt < len {
            out.extend_from_slice(&digits[..decpt as usize]);
            out.push(b'.');
            out.extend_from_slice(&digits[decpt as usize..]);
        } else {
            out.extend_from_slice(digits);
            for _ in 0..decpt - len {
                out.push(b'0');
            }
            out.extend_from_slice(b".0");
        }
    } else {
        out.push(digits[0]);
        if len > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        let _ = write!(out, "e{}", decpt - 1);
    }
}

fn json_opaque(field_type: u8, v: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    use ColumnType as T;
    let ft = field_type;
    if ft == T::MYSQL_TYPE_NEWDECIMAL as u8 {
        let (&p, rest) = v.split_first().ok_or("bad JSON decimal")?;
        let (&s, bin) = rest.split_first().ok_or("bad JSON decimal")?;
        let size = decimal_bin_size(p, s);
        let bin = bin.get(..size).ok_or("bad JSON decimal")?;
        return format_decimal_bin(bin, p, s, out).ok_or_else(|| json_err("bad JSON decimal"));
    }
    let is_date = ft == T::MYSQL_TYPE_DATE as u8 || ft == T::MYSQL_TYPE_NEWDATE as u8;
    let is_dt = ft == T::MYSQL_TYPE_DATETIME as u8 || ft == T::MYSQL_TYPE_TIMESTAMP as u8;
    let is_time = ft == T::MYSQL_TYPE_TIME as u8;
    if is_date || is_dt || is_time {
        // Packed longlong (int part << 24 | microseconds), little-endian.
        let packed = rd(v, 0, 8)? as i64;
        let p = packed.unsigned_abs();
        let int = p >> 24;
        let micros = p % (1 << 24);
        out.push(b'"');
        if is_time {
            format_time_packed(out, packed, 6);
        } else {
            let ymd = int >> 17;
            let ym = ymd >> 5;
            let hms = int % (1 << 17);
            if is_date {
                format_date(out, (ym / 13) as u32, (ym % 13) as u32, (ymd % 32) as u32);
            } else {
                format_datetime(
                    out,
                    (ym / 13) as u32,
                    (ym % 13) as u32,
                    (ymd % 32) as u32,
                    (hms >> 12) as u32,
                    ((hms >> 6) % 64) as u32,
                    (hms % 64) as u32,
                    micros,
                    6,
                );
            }
        }
        out.push(b'"');
        return Ok(());
    }
    // Anything else MySQL prints as "base64:typeNN:<base64 data>".
    let _ = write!(out, "\"base64:type{ft}:");
    base64(v, out);
    out.push(b'"');
    Ok(())
}

fn base64(data: &[u8], out: &mut Vec<u8>) {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63]);
        out.push(T[(n >> 12) as usize & 63]);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] } else { b'=' });
        out.push(if c.len() > 2 { T[n as usize & 63] } else { b'=' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    /// MySQL's binary DECIMAL encoding of a decimal string (test helper).
    fn dec_bin(text: &str, precision: u8, scale: u8) -> Vec<u8> {
        let neg = text.starts_with('-');
        let t = text.trim_start_matches('-');
        let (ip, fp) = t.split_once('.').unwrap_or((t, ""));
        let intg = usize::from(precision - scale);
        let ip = format!("{ip:0>intg$}");
        let ip = &ip[ip.len() - intg..];
        let fp = format!("{fp:0<w$}", w = usize::from(scale));
        let mut out = Vec::new();
        let mut put = |digits: &str| {
            if digits.is_empty() {
                return;
            }
            let v: u32 = digits.parse().unwrap();
            let n = DIG2BYTES[digits.len()];
            out.extend_from_slice(&v.to_be_bytes()[4 - n..]);
        };
        let lead = intg % 9;
        put(&ip[..lead]);
        for c in ip.as_bytes()[lead..].chunks(9) {
            put(std::str::from_utf8(c).unwrap());
        }
        for c in fp.as_bytes().chunks(9) {
            put(std::str::from_utf8(c).unwrap());
        }
        out[0] ^= 0x80;
        if neg {
            for b in &mut out {
                *b = !*b;
            }
        }
        out
    }

    fn dec(text: &str, p: u8, sc: u8) -> String {
        let bin = dec_bin(text, p, sc);
        assert_eq!(bin.len(), decimal_bin_size(p, sc));
        s(|o| format_decimal_bin(&bin, p, sc, o).unwrap())
    }

    #[test]
    fn decimals() {
        assert_eq!(dec("12.5", 10, 2), "12.50");
        assert_eq!(dec("-0.01", 10, 2), "-0.01");
        assert_eq!(dec("0", 10, 2), "0.00");
        assert_eq!(dec("100", 5, 0), "100");
        assert_eq!(dec("-100", 5, 0), "-100");
        assert_eq!(dec("0", 1, 0), "0");
        assert_eq!(dec("1234567890.123456789", 20, 9), "1234567890.123456789");
        assert_eq!(dec("-98765432109876543210.5", 30, 1), "-98765432109876543210.5");
        assert_eq!(dec("0.000000001", 30, 30), "0.000000001000000000000000000000");
        assert_eq!(dec("-1.5", 65, 30), "-1.500000000000000000000000000000");
        // Known bytes from the MySQL docs (DECIMAL(14,4) 1234567890.1234).
        let bin = [0x81, 0x0D, 0xFB, 0x38, 0xD2, 0x04, 0xD2];
        assert_eq!(s(|o| format_decimal_bin(&bin, 14, 4, o).unwrap()), "1234567890.1234");
        let neg: Vec<u8> = bin.iter().map(|b| !b).collect();
        assert_eq!(s(|o| format_decimal_bin(&neg, 14, 4, o).unwrap()), "-1234567890.1234");
        assert!(format_decimal_bin(&bin[..3], 14, 4, &mut Vec::new()).is_none());
    }

    #[test]
    fn temporal() {
        assert_eq!(s(|o| format_date(o, 2024, 2, 9)), "2024-02-09");
        assert_eq!(s(|o| format_date(o, 0, 0, 0)), "0000-00-00");
        assert_eq!(s(|o| format_datetime(o, 2024, 1, 2, 3, 4, 5, 123, 6)), "2024-01-02 03:04:05.000123");
        assert_eq!(s(|o| format_datetime(o, 2024, 1, 2, 3, 4, 5, 120_000, 3)), "2024-01-02 03:04:05.120");
        assert_eq!(s(|o| format_datetime(o, 0, 0, 0, 0, 0, 0, 0, 0)), "0000-00-00 00:00:00");
        assert_eq!(s(|o| format_time(o, true, 838, 59, 59, 0, 0)), "-838:59:59");
        assert_eq!(s(|o| format_time(o, false, 1, 2, 3, 500_000, 1)), "01:02:03.5");
        assert_eq!(s(|o| format_timestamp_utc(o, 1_700_000_000, 0, 0)), "2023-11-14 22:13:20");
        assert_eq!(s(|o| format_timestamp_utc(o, 951_782_400, 5, 6)), "2000-02-29 00:00:00.000005");
        assert_eq!(s(|o| format_timestamp_utc(o, 0, 0, 3)), "0000-00-00 00:00:00.000");
    }

    #[test]
    #[allow(clippy::approx_constant)]
    fn floats_and_json_doubles() {
        assert_eq!(float_to_f64(3.14f32), 3.14);
        assert_eq!(float_to_f64(0.1f32), 0.1);
        assert_eq!(float_to_f64(-1.5e-7f32), -1.5e-7);
        assert_eq!(float_to_f64(16777216.0f32), 16777216.0);
        let j = |d: f64| s(|o| format_json_double(d, o));
        assert_eq!(j(1.5), "1.5");
        assert_eq!(j(1.0), "1.0");
        assert_eq!(j(1e100), "1e100");
        assert_eq!(j(-2.5e-20), "-2.5e-20");
        assert_eq!(j(0.00001), "0.00001");
        assert_eq!(j(123456789012345.0), "123456789012345.0");
        assert_eq!(j(1e15), "1e15");
    }

    #[test]
    fn set_enum_labels() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|x| x.to_string()).collect();
        assert_eq!(s(|o| format_set(0b101, &labels, o)), "a,c");
        assert_eq!(s(|o| format_set(0, &labels, o)), "");
    }

    fn codec(plans: Vec<Plan>) -> TableCodec {
        TableCodec { plans, table: "db.t".into() }
    }

    /// A WRITE_ROWS_V2 body for one row of `values` (all present, none NULL).
    fn write_v2(ncols: u8, row: &[u8]) -> Vec<u8> {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 0, ncols];
        b.extend(std::iter::repeat_n(0xff, usize::from(ncols).div_ceil(8)));
        b.extend(std::iter::repeat_n(0x00, usize::from(ncols).div_ceil(8)));
        b.extend_from_slice(row);
        b
    }

    fn decode_one(c: &TableCodec, body: &[u8]) -> Result<Vec<String>, DecodeFailure> {
        let mut out = Vec::new();
        RowDecoder::new().decode(30, body, c, &mut |ch| {
            if let RowChange::Insert(r) = ch {
                out.push(
                    r.iter()
                        .map(|v| match v {
                            ValueRef::Text(t) => format!("Text({:?})", String::from_utf8_lossy(t)),
                            other => format!("{other:?}"),
                        })
                        .collect::<Vec<_>>(),
                );
            }
            Ok(())
        })?;
        Ok(out.pop().unwrap_or_default())
    }

    #[test]
    fn row_values() {
        let labels = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let c = codec(vec![
            Plan::Int { width: 8, unsigned: true },
            Plan::Int { width: 3, unsigned: false },
            Plan::Str { len_bytes: 1, text: None, pad_to: 4 },
            Plan::Str { len_bytes: 1, text: Some(Charset::from_mysql_name("latin1")), pad_to: 0 },
            Plan::Str { len_bytes: 1, text: Some(Charset::from_mysql_name("cp1251")), pad_to: 0 },
            Plan::Blob { len_bytes: 2, text: Some(Charset::Utf8) },
            Plan::Enum { size: 1, labels: labels(&["x", "y"]) },
            Plan::Set { nbytes: 1, labels: labels(&["p", "q", "r"]) },
            Plan::Year,
        ]);
        let mut row = Vec::new();
        row.extend_from_slice(&u64::MAX.to_le_bytes());
        row.extend_from_slice(&[0xfe, 0xff, 0xff]); // -2
        row.extend_from_slice(&[2, 0xab, 0xcd]);
        row.extend_from_slice(&[4, b'c', b'a', b'f', 0xe9]);
        row.extend_from_slice(&[2, 0xcf, 0xf0]);
        row.extend_from_slice(&[4, 0, 0xf0, 0x9f, 0x98, 0x80]);
        row.push(2);
        row.push(0b110);
        row.push(124);
        let body = write_v2(9, &row);
        let got = decode_one(&c, &body).unwrap();
        assert_eq!(got[0], r#"Text("18446744073709551615")"#);
        assert_eq!(got[1], "Integer(-2)");
        assert_eq!(got[2], "Blob([171, 205, 0, 0])");
        assert_eq!(got[3], r#"Text("café")"#);
        assert_eq!(got[4], r#"Text("Пр")"#);
        assert_eq!(got[5], r#"Text("😀")"#);
        assert_eq!(got[6], r#"Text("y")"#);
        assert_eq!(got[7], r#"Text("q,r")"#);
        assert_eq!(got[8], "Integer(2024)");
        // Truncated input is Malformed, never a panic.
        for cut in 0..body.len() {
            match decode_one(&c, &body[..cut]) {
                Err(DecodeFailure::Decode(DecodeError::Malformed(_))) => {}
                Ok(v) if v.is_empty() => {} // row-less event
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        // A missing column in the present bitmap is a partial image.
        let mut partial = body.clone();
        partial[11] = 0xfe;
        assert!(matches!(decode_one(&c, &partial), Err(DecodeFailure::Decode(DecodeError::PartialImage(_)))));
        assert!(matches!(
            RowDecoder::new().decode(39, &body, &c, &mut |_| Ok(())),
            Err(DecodeFailure::Decode(DecodeError::Unsupported(_)))
        ));
    }

    #[test]
    fn cheap_header_helpers() {
        assert_eq!(rows_kind(23), Some(RowsKind::Write));
        assert_eq!(rows_kind(31), Some(RowsKind::Update));
        assert_eq!(rows_kind(25), Some(RowsKind::Delete));
        assert_eq!(rows_kind(39), None);
        assert_eq!(rows_table_id(&[1, 2, 0, 0, 0, 0, 9]), Some(0x201));
        assert_eq!(rows_table_id(&[1]), None);
    }
}
