//! What we know about a watched table's columns, from `information_schema`
//! (authoritative for names, signedness, charset and ENUM/SET labels) and
//! cross-checked against each binlog TABLE_MAP before its rows are decoded.

use crate::config::TableRef;

/// The replica's storage class for a column, per the value-mapping contract
/// in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// Integers, YEAR, BIT.
    Integer,
    /// BIGINT UNSIGNED: INTEGER up to i64::MAX, decimal TEXT above.
    /// Declared without a type so SQLite keeps each value as given.
    U64,
    Real,
    Text,
    Blob,
}

impl Affinity {
    pub fn sqlite_decl(self) -> &'static str {
        match self {
            Affinity::Integer => "INTEGER",
            Affinity::U64 => "",
            Affinity::Real => "REAL",
            Affinity::Text => "TEXT",
            Affinity::Blob => "BLOB",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    pub name: String,
    /// `information_schema.COLUMNS.DATA_TYPE`, lower case: `int`, `varchar`,
    /// `decimal`, `datetime`, `enum`, `json`, ...
    pub data_type: String,
    /// `COLUMN_TYPE`, e.g. `decimal(10,2)`, `int(10) unsigned`, `enum('a','b')`.
    pub column_type: String,
    pub unsigned: bool,
    /// `CHARACTER_SET_NAME` for character columns (`utf8mb4`, `latin1`, ...).
    pub charset: Option<String>,
    pub numeric_precision: Option<u32>,
    pub numeric_scale: Option<u32>,
    /// Fractional seconds digits of TIME/DATETIME/TIMESTAMP.
    pub datetime_precision: Option<u32>,
    /// ENUM or SET labels in declaration order.
    pub labels: Vec<String>,
    pub nullable: bool,
}

impl ColumnDef {
    /// A nullable column of `data_type` (its column type too), utf8mb4 when
    /// `varchar`: what unit tests need to build a schema.
    #[cfg(test)]
    pub fn for_tests(name: &str, data_type: &str) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            data_type: data_type.into(),
            column_type: data_type.into(),
            unsigned: false,
            charset: (data_type == "varchar").then(|| "utf8mb4".into()),
            numeric_precision: None,
            numeric_scale: None,
            datetime_precision: None,
            labels: vec![],
            nullable: true,
        }
    }

    pub fn affinity(&self) -> Affinity {
        match self.data_type.as_str() {
            "bigint" if self.unsigned => Affinity::U64,
            // Only BIT(64) can exceed i64::MAX: decimal text above it, like BIGINT UNSIGNED.
            "bit" if self.numeric_precision == Some(64) => Affinity::U64,
            "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" | "bit" | "bool"
            | "boolean" => Affinity::Integer,
            "float" | "double" | "real" | "double precision" => Affinity::Real,
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry" | "point"
            | "linestring" | "polygon" | "multipoint" | "multilinestring" | "multipolygon" | "geometrycollection"
            | "geomcollection" | "vector" => Affinity::Blob,
            // MariaDB reports BINARY(n)/VARBINARY with a "binary" charset too.
            _ if self.charset.as_deref() == Some("binary") => Affinity::Blob,
            _ => Affinity::Text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub table: TableRef,
    pub columns: Vec<ColumnDef>,
    /// Indexes into `columns`, in primary-key order.
    pub primary_key: Vec<usize>,
}

impl TableSchema {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name.eq_ignore_ascii_case(name))
    }
}

/// Parses the labels out of `enum('a','b''c')` / `set(...)`.
pub fn parse_labels(column_type: &str) -> Vec<String> {
    let Some(open) = column_type.find('(') else { return Vec::new() };
    let body = &column_type[open + 1..column_type.rfind(')').unwrap_or(column_type.len())];
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quote {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    cur.push('\'');
                } else {
                    in_quote = false;
                    out.push(std::mem::take(&mut cur));
                }
            } else if c == '\\' {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            } else {
                cur.push(c);
            }
        } else if c == '\'' {
            in_quote = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(parse_labels("enum('a','b''c','d,e')"), vec!["a", "b'c", "d,e"]);
        assert_eq!(parse_labels("set('x')"), vec!["x"]);
        assert!(parse_labels("int(11)").is_empty());
    }
}
