//! Replica tables: DDL from a MySQL schema, row statements, checkpoint writes.

use rusqlite::{Connection, params};

use crate::error::{Error, Result};
use crate::position::{BinlogPosition, Checkpoint};
use crate::schema::TableSchema;

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `"name"` or `schema."name"` as SQLite reaches the table.
pub fn qualified(schema: &TableSchema) -> String {
    if schema.table.qualified {
        format!("{}.{}", quote_ident(&schema.table.schema), quote_ident(&schema.table.name))
    } else {
        quote_ident(&schema.table.name)
    }
}

/// Drops and recreates the table with the schema's columns, keyed by the
/// MySQL primary key. WITHOUT ROWID keeps rows clustered by that key.
pub fn recreate_table(conn: &Connection, schema: &TableSchema) -> Result<()> {
    let name = qualified(schema);
    let mut cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| format!("{} {}", quote_ident(&c.name), c.affinity().sqlite_decl()).trim_end().to_owned())
        .collect();
    let without_rowid = if schema.primary_key.is_empty() {
        ""
    } else {
        let pk: Vec<String> = schema.primary_key.iter().map(|&i| quote_ident(&schema.columns[i].name)).collect();
        cols.push(format!("PRIMARY KEY ({})", pk.join(", ")));
        " WITHOUT ROWID"
    };
    let sql = format!("DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({}){without_rowid};", cols.join(", "));
    conn.execute_batch(&sql).map_err(|e| Error::sqlite(format!("create replica table {}", schema.table), e))
}

pub fn write_checkpoint(conn: &Connection, cp: &Checkpoint, consistent: bool) -> Result<()> {
    // Once per commit: a cached statement, not a parse each time.
    conn.prepare_cached("UPDATE _tailcache_state SET file = ?1, pos = ?2, gtid = ?3, consistent = ?4 WHERE id = 1")
        .and_then(|mut st| {
            st.execute(params![
                cp.position.file,
                cp.position.pos as i64,
                cp.gtid.as_ref().map(|g| g.to_string()),
                consistent
            ])
        })
        .map_err(|e| Error::sqlite("write checkpoint", e))?;
    Ok(())
}

/// Where the replica becomes consistent again after a snapshot (`None`:
/// it already is), the server it follows and the table list it holds.
pub fn write_meta(
    conn: &Connection,
    consistent_after: Option<&BinlogPosition>,
    identity: &str,
    tables: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE _tailcache_state SET consistent_after_file = ?1, consistent_after_pos = ?2, server_identity = ?3, tables = ?4 WHERE id = 1",
        params![consistent_after.map(|p| p.file.clone()), consistent_after.map(|p| p.pos as i64), identity, tables],
    )
    .map_err(|e| Error::sqlite("write replica metadata", e))?;
    Ok(())
}

pub struct Meta {
    pub consistent_after: Option<BinlogPosition>,
    pub identity: Option<String>,
    pub tables: Option<String>,
}

pub fn read_meta(conn: &Connection) -> Result<Meta> {
    conn.query_row(
        "SELECT consistent_after_file, consistent_after_pos, server_identity, tables FROM _tailcache_state WHERE id = 1",
        [],
        |r| {
            let f: Option<String> = r.get(0)?;
            let p: Option<i64> = r.get(1)?;
            Ok(Meta {
                consistent_after: f.zip(p).map(|(f, p)| BinlogPosition::new(f, p as u64)),
                identity: r.get(2)?,
                tables: r.get(3)?,
            })
        },
    )
    .map_err(|e| Error::sqlite("read replica metadata", e))
}
