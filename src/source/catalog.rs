//! Table definitions from `information_schema`.

use mysql_async::Conn;
use mysql_async::prelude::*;

use crate::config::TableRef;
use crate::error::{Error, Result};
use crate::schema::{ColumnDef, TableSchema, parse_labels};
use crate::source::conn::get;

/// The table's columns and primary key, `None` when it does not exist.
pub async fn load_table_schema(conn: &mut Conn, table: &TableRef) -> Result<Option<TableSchema>> {
    let rows: Vec<mysql_async::Row> = conn
        .exec(
            "SELECT CAST(COLUMN_NAME AS CHAR), CAST(LOWER(DATA_TYPE) AS CHAR), CAST(LOWER(COLUMN_TYPE) AS CHAR), \
                    CAST(CHARACTER_SET_NAME AS CHAR), NUMERIC_PRECISION, NUMERIC_SCALE, DATETIME_PRECISION, \
                    CAST(IS_NULLABLE AS CHAR) \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (&table.schema, &table.name),
        )
        .await
        .map_err(|e| Error::mysql(format!("read columns of {table}"), e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut columns = Vec::with_capacity(rows.len());
    for r in &rows {
        let (Some(name), Some(data_type), Some(column_type)) =
            (get::<String>(r, 0), get::<String>(r, 1), get::<String>(r, 2))
        else {
            return Err(Error::Transient(format!("unreadable information_schema.COLUMNS row for {table}")));
        };
        columns.push(ColumnDef {
            unsigned: column_type.contains("unsigned"),
            labels: if data_type == "enum" || data_type == "set" { parse_labels(&column_type) } else { Vec::new() },
            name,
            data_type,
            column_type,
            charset: get::<Option<String>>(r, 3).flatten(),
            numeric_precision: get::<Option<u64>>(r, 4).flatten().map(|v| v as u32),
            numeric_scale: get::<Option<u64>>(r, 5).flatten().map(|v| v as u32),
            datetime_precision: get::<Option<u64>>(r, 6).flatten().map(|v| v as u32),
            nullable: get::<String>(r, 7).is_some_and(|n| n.eq_ignore_ascii_case("YES")),
        });
    }
    let pk_rows: Vec<mysql_async::Row> = conn
        .exec(
            "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
            (&table.schema, &table.name),
        )
        .await
        .map_err(|e| Error::mysql(format!("read primary key of {table}"), e))?;
    let pk_names: Vec<String> = pk_rows.iter().filter_map(|r| get::<String>(r, 0)).collect();
    let primary_key =
        pk_names.iter().filter_map(|n| columns.iter().position(|c| c.name.eq_ignore_ascii_case(n))).collect();
    Ok(Some(TableSchema { table: table.clone(), columns, primary_key }))
}
