//! Replica tables: DDL from a MySQL schema, row statements, checkpoint writes.

use rusqlite::types::{ToSqlOutput, ValueRef};
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

/// Row statements for one table, as SQL text for `prepare_cached`.
#[derive(Debug, Clone)]
pub struct RowSql {
    pub upsert: String,
    pub delete: String,
    pub truncate: String,
    pub pk: Vec<usize>,
}

impl RowSql {
    pub fn new(schema: &TableSchema) -> Self {
        let name = qualified(schema);
        let cols: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let params: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let pk_cond: Vec<String> = schema
            .primary_key
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("{} = ?{}", quote_ident(&schema.columns[i].name), n + 1))
            .collect();
        Self {
            upsert: format!("INSERT OR REPLACE INTO {name} ({}) VALUES ({})", cols.join(", "), params.join(", ")),
            delete: format!("DELETE FROM {name} WHERE {}", pk_cond.join(" AND ")),
            truncate: format!("DELETE FROM {name}"),
            pk: schema.primary_key.clone(),
        }
    }

    pub fn upsert(&self, conn: &Connection, row: &[ValueRef<'_>]) -> rusqlite::Result<()> {
        let mut st = conn.prepare_cached(&self.upsert)?;
        for (i, v) in row.iter().enumerate() {
            st.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(*v))?;
        }
        st.raw_execute()?;
        Ok(())
    }

    pub fn delete(&self, conn: &Connection, row: &[ValueRef<'_>]) -> rusqlite::Result<()> {
        let mut st = conn.prepare_cached(&self.delete)?;
        for (n, &i) in self.pk.iter().enumerate() {
            st.raw_bind_parameter(n + 1, ToSqlOutput::Borrowed(row.get(i).copied().unwrap_or(ValueRef::Null)))?;
        }
        st.raw_execute()?;
        Ok(())
    }

    pub fn same_key(&self, a: &[ValueRef<'_>], b: &[ValueRef<'_>]) -> bool {
        self.pk.iter().all(|&i| a.get(i) == b.get(i))
    }
}

pub fn write_checkpoint(conn: &Connection, cp: &Checkpoint, consistent: bool) -> Result<()> {
    conn.execute(
        "UPDATE _tailcache_state SET file = ?1, pos = ?2, gtid = ?3, consistent = ?4 WHERE id = 1",
        params![cp.position.file, cp.position.pos as i64, cp.gtid.as_ref().map(|g| g.to_string()), consistent],
    )
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
