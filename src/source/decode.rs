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
//! Values are formatted by `crate::replica::value` (shared with the
//! snapshot, so both paths produce identical strings).

use std::io::Write as _;

use mysql_common::binlog::events::{OptionalMetaExtractor, OptionalMetadataField, TableMapEvent};
use mysql_common::collations::{Collation, CollationId};
use mysql_common::constants::ColumnType;
use rusqlite::types::ValueRef;

use crate::config::TableRef;
use crate::replica::value::{
    decimal_bin_size, float_to_f64, format_date, format_datetime, format_decimal_bin, format_json, format_set,
    format_time, format_time_packed, format_timestamp_utc,
};
use crate::schema::{ColumnDef, TableSchema};
use crate::source::charset::{self, Charset};
use crate::source::json_diff;

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
/// MySQL 5.1–5.5) and v2 (MySQL 5.6+), and MySQL's PARTIAL_UPDATE_ROWS
/// (an UPDATE whose JSON after-values may be diffs, decoded to full
/// values). `None` for anything else.
pub fn rows_kind(event_type: u8) -> Option<RowsKind> {
    match event_type {
        23 | 30 => Some(RowsKind::Write),
        24 | 31 | 39 => Some(RowsKind::Update),
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
    /// `index`: the column's position among the table's JSON columns (its
    /// bit in a PARTIAL_UPDATE_ROWS event's partial bitmap).
    Json {
        len_bytes: u8,
        index: usize,
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
    /// Column names, for errors.
    names: Vec<String>,
    /// JSON columns in the table (bits of a partial-JSON bitmap).
    json_count: usize,
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
        Plan::Json { len_bytes, index: 0 }
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
        let mut json_count = 0;
        for (i, col) in schema.columns.iter().enumerate() {
            let w = wire_col(tme, i)?;
            let mut plan = build_plan(&w, col)?;
            if let Plan::Json { index, .. } = &mut plan {
                *index = json_count;
                json_count += 1;
            }
            plans.push(plan);
        }
        let names = schema.columns.iter().map(|c| c.name.clone()).collect();
        Ok(TableCodec { plans, table: schema.table.to_string(), names, json_count })
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
    /// PARTIAL_UPDATE_ROWS: where each JSON column's binary before-value
    /// is in the event (None when NULL), by JSON column index.
    json_before: Vec<Option<(usize, usize)>>,
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
            return Err(DecodeError::Unsupported(format!("event type {event_type} is not a rows event")).into());
        };
        let partial_event = event_type == event_type::PARTIAL_UPDATE_ROWS;
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
            if partial_event {
                // before image | value_options [partial bits] | after image
                self.json_before.clear();
                self.json_before.resize(codec.json_count, None);
                let before = JsonImage::Record(&mut self.json_before);
                decode_image(&mut r, codec, &mut self.scratch, &mut self.slots, before)?;
                let value_options = r.lenenc()?;
                if value_options & !1 != 0 {
                    return Err(DecodeError::Unsupported(format!(
                        "PARTIAL_UPDATE_ROWS value_options {value_options:#x} for {}",
                        codec.table
                    ))
                    .into());
                }
                let after = if value_options & 1 != 0 {
                    let bits = r.take(codec.json_count.div_ceil(8))?;
                    JsonImage::Partial { bits, before: &self.json_before }
                } else {
                    JsonImage::Plain
                };
                decode_image(&mut r, codec, &mut self.scratch, &mut self.slots, after)?;
            } else {
                for _ in 0..images {
                    decode_image(&mut r, codec, &mut self.scratch, &mut self.slots, JsonImage::Plain)?;
                }
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

/// What an image means for JSON columns (PARTIAL_UPDATE_ROWS events).
enum JsonImage<'x> {
    Plain,
    /// A before image: note where each JSON column's binary value is.
    Record(&'x mut [Option<(usize, usize)>]),
    /// An after image with partial JSON: a column whose bit is set in
    /// `bits` holds diffs against its value in `before`.
    Partial {
        bits: &'x [u8],
        before: &'x [Option<(usize, usize)>],
    },
}

fn decode_image(
    r: &mut Reader<'_>,
    codec: &TableCodec,
    scratch: &mut Vec<u8>,
    slots: &mut Vec<Slot>,
    mut json: JsonImage<'_>,
) -> Result<(), DecodeError> {
    let n = codec.plans.len();
    let nulls = r.take(n.div_ceil(8))?;
    for (i, plan) in codec.plans.iter().enumerate() {
        if nulls[i / 8] & (1 << (i % 8)) != 0 {
            slots.push(Slot::Null);
            continue;
        }
        let start = r.pos;
        let slot = match (plan, &mut json) {
            (&Plan::Json { len_bytes, index }, JsonImage::Partial { bits, before })
                if bits[index / 8] & (1 << (index % 8)) != 0 =>
            {
                partial_json(len_bytes, r, before[index], scratch).map_err(|e| {
                    DecodeError::Malformed(format!(
                        "{} column {} ({}): partial JSON update: {e}",
                        codec.table,
                        i + 1,
                        codec.names[i]
                    ))
                })?
            }
            _ => decode_value(plan, r, scratch).map_err(|e| match e {
                DecodeError::Malformed(m) => DecodeError::Malformed(format!("{} column {}: {m}", codec.table, i + 1)),
                other => other,
            })?,
        };
        if let (&Plan::Json { len_bytes, index }, JsonImage::Record(before)) = (plan, &mut json) {
            before[index] = Some((start + usize::from(len_bytes), r.pos));
        }
        slots.push(slot);
    }
    Ok(())
}

/// A partial JSON value (length, then a diff vector) applied to the
/// column's binary before-value at `before` in the event.
fn partial_json(
    len_bytes: u8,
    r: &mut Reader<'_>,
    before: Option<(usize, usize)>,
    scratch: &mut Vec<u8>,
) -> Result<Slot, String> {
    let len = r.uint_le(usize::from(len_bytes)).map_err(|e| e.to_string())? as usize;
    let diffs = r.take(len).map_err(|e| e.to_string())?;
    let (a, b) = before.ok_or("the before image holds NULL, which diffs cannot apply to")?;
    let s0 = scratch.len();
    json_diff::apply_diffs_into(&r.buf[a..b], diffs, scratch).map_err(|e| e.to_string())?;
    Ok(Slot::ScText(s0, scratch.len()))
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
        Plan::Json { len_bytes, .. } => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(mut plans: Vec<Plan>) -> TableCodec {
        let mut json_count = 0;
        for p in &mut plans {
            if let Plan::Json { index, .. } = p {
                *index = json_count;
                json_count += 1;
            }
        }
        let names = (1..=plans.len()).map(|i| format!("c{i}")).collect();
        TableCodec { plans, table: "db.t".into(), names, json_count }
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
            RowDecoder::new().decode(36, &body, &c, &mut |_| Ok(())),
            Err(DecodeFailure::Decode(DecodeError::Unsupported(_)))
        ));
    }

    /// A PARTIAL_UPDATE_ROWS body: one row, all columns present and not
    /// NULL, `value_options`/`partial` as given.
    fn partial_update(ncols: u8, before: &[u8], value_options: u8, partial: &[u8], after: &[u8]) -> Vec<u8> {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 0, ncols];
        let nb = usize::from(ncols).div_ceil(8);
        b.extend(std::iter::repeat_n(0xff, 2 * nb));
        b.extend(std::iter::repeat_n(0x00, nb));
        b.extend_from_slice(before);
        b.push(value_options);
        b.extend_from_slice(partial);
        b.extend(std::iter::repeat_n(0x00, nb));
        b.extend_from_slice(after);
        b
    }

    fn json_value(jsonb: &[u8]) -> Vec<u8> {
        let mut v = (jsonb.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(jsonb);
        v
    }

    type Images = (Vec<String>, Vec<String>);

    fn updates(c: &TableCodec, body: &[u8]) -> Result<Vec<Images>, DecodeFailure> {
        let text = |r: &[ValueRef<'_>]| {
            r.iter()
                .map(|v| match v {
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        let mut out = Vec::new();
        RowDecoder::new().decode(39, body, c, &mut |ch| {
            if let RowChange::Update { before, after } = ch {
                out.push((text(before), text(after)));
            }
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn partial_json_update() {
        use crate::source::json_diff::{DiffOp, encode_diff, jsonb_from_serde};
        let jb = |t: &str| jsonb_from_serde(&serde_json::from_str(t).unwrap());
        // id INT, j1 JSON, j2 JSON: j1 gets diffs, j2 a full value.
        let c = codec(vec![
            Plan::Int { width: 4, unsigned: false },
            Plan::Json { len_bytes: 4, index: 0 },
            Plan::Json { len_bytes: 4, index: 0 },
        ]);
        let mut before = 7i32.to_le_bytes().to_vec();
        before.extend(json_value(&jb(r#"{"a": [1, 2], "b": "x"}"#)));
        before.extend(json_value(&jb("[1]")));
        let mut diffs = Vec::new();
        encode_diff(DiffOp::Insert, "$.a[2]", Some(&jb("3")), &mut diffs);
        encode_diff(DiffOp::Insert, "$.aa", Some(&jb("true")), &mut diffs);
        encode_diff(DiffOp::Remove, "$.b", None, &mut diffs);
        let mut after = 7i32.to_le_bytes().to_vec();
        after.extend(json_value(&diffs));
        after.extend(json_value(&jb(r#"{"k": 1.5}"#)));
        let body = partial_update(3, &before, 1, &[0b01], &after);
        let got = updates(&c, &body).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, ["Integer(7)", r#"{"a": [1, 2], "b": "x"}"#, "[1]"]);
        assert_eq!(got[0].1, ["Integer(7)", r#"{"a": [1, 2, 3], "aa": true}"#, r#"{"k": 1.5}"#]);

        // value_options 0: a plain after image, no partial bitmap.
        let mut plain_after = 7i32.to_le_bytes().to_vec();
        plain_after.extend(json_value(&jb("{}")));
        plain_after.extend(json_value(&jb("2")));
        let body0 = partial_update(3, &before, 0, &[], &plain_after);
        assert_eq!(updates(&c, &body0).unwrap()[0].1, ["Integer(7)", "{}", "2"]);

        // A diff that does not apply names the column; never a panic.
        let mut bad = Vec::new();
        encode_diff(DiffOp::Replace, "$.nope", Some(&jb("1")), &mut bad);
        let mut bad_after = 7i32.to_le_bytes().to_vec();
        bad_after.extend(json_value(&bad));
        bad_after.extend(json_value(&jb("1")));
        match updates(&c, &partial_update(3, &before, 1, &[0b01], &bad_after)) {
            Err(DecodeFailure::Decode(DecodeError::Malformed(m))) => {
                assert!(m.contains("db.t column 2 (c2): partial JSON update") && m.contains("$.nope"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // Unknown value_options bits are refused.
        assert!(matches!(
            updates(&c, &partial_update(3, &before, 2, &[], &plain_after)),
            Err(DecodeFailure::Decode(DecodeError::Unsupported(_)))
        ));
        // Truncations are errors, never panics.
        for cut in 0..body.len() {
            match updates(&c, &body[..cut]) {
                Err(DecodeFailure::Decode(_)) => {}
                Ok(v) if v.is_empty() => {}
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        // Diffs against a NULL before value are an error.
        let mut null_before = vec![1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 3, 0xff, 0xff, 0b010];
        null_before.extend_from_slice(&7i32.to_le_bytes());
        null_before.extend(json_value(&jb("[1]")));
        null_before.extend_from_slice(&[1, 0b01, 0]);
        null_before.extend_from_slice(&after);
        match updates(&c, &null_before) {
            Err(DecodeFailure::Decode(DecodeError::Malformed(m))) => assert!(m.contains("NULL"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cheap_header_helpers() {
        assert_eq!(rows_kind(23), Some(RowsKind::Write));
        assert_eq!(rows_kind(31), Some(RowsKind::Update));
        assert_eq!(rows_kind(25), Some(RowsKind::Delete));
        assert_eq!(rows_kind(39), Some(RowsKind::Update));
        assert_eq!(rows_kind(36), None);
        assert_eq!(rows_table_id(&[1, 2, 0, 0, 0, 0, 9]), Some(0x201));
        assert_eq!(rows_table_id(&[1]), None);
    }
}
