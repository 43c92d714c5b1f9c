//! Every binlog event type, and what the replicator does with it.
//!
//! [`classify`] is an exhaustive match over the raw type byte: each type is
//! applied, ignored for a stated reason (and counted), or an error that
//! names it. A type that appears in a future server is an error with its
//! position, never silently skipped; a new variant in `mysql_common` does not
//! change anything here because we match on the wire byte.

use mysql_common::binlog::events::{BinlogEventHeader, FormatDescriptionEvent};
use mysql_common::binlog::{BinlogCtx, BinlogEvent};
use mysql_common::io::ParseBuf;

/// MySQL's GTID event type (the others are matched by [`classify`]).
pub const GTID: u8 = 33;
/// FORMAT_DESCRIPTION: the stream's post-header lengths and checksum.
pub const FORMAT_DESCRIPTION: u8 = 15;
/// TRANSACTION_PAYLOAD: may not appear inside another payload.
pub const TRANSACTION_PAYLOAD: u8 = 40;

/// Parses an event body (post-header and payload, no checksum) with one of
/// `mysql_common`'s event structs, exactly as `Event::read_event` does, but
/// straight from the bytes we already hold: used for the few events that
/// need it (ROTATE, QUERY, GTID, TABLE_MAP of watched tables, payloads).
pub fn parse_body<'a, T: BinlogEvent<'a>>(
    fde: &'a FormatDescriptionEvent<'a>,
    event_type: u8,
    body: &'a [u8],
) -> std::io::Result<T> {
    let mut buf = ParseBuf(body);
    let event = buf.parse(BinlogCtx::new(BinlogEventHeader::LEN + body.len(), fde, event_type))?;
    if !buf.is_empty() {
        return Err(std::io::Error::other(format!(
            "bytes remaining on stream while reading {}",
            std::any::type_name::<T>()
        )));
    }
    Ok(event)
}

/// A TABLE_MAP body's table id, database and table name, read straight from
/// the bytes (table id u48 | flags u16 | db len u8 | db | NUL | table len u8 |
/// table | NUL | …), and the bytes from the database name on, which
/// determine the decoder (names, column types, metadata, nullability): the
/// same bytes mean the same decoder, whatever the table id.
pub struct TableMapNames<'a> {
    pub table_id: u64,
    pub database: &'a [u8],
    pub table: &'a [u8],
    pub shape: &'a [u8],
}

pub fn table_map_names(body: &[u8]) -> Option<TableMapNames<'_>> {
    let table_id = crate::source::decode::rows_table_id(body)?;
    let shape = body.get(8..)?;
    let db_len = usize::from(*shape.first()?);
    let database = shape.get(1..1 + db_len)?;
    let t = 1 + db_len + 1; // length byte, name, NUL
    let table_len = usize::from(*shape.get(t)?);
    let table = shape.get(t + 1..t + 1 + table_len)?;
    Some(TableMapNames { table_id, database, table, shape })
}

/// What the replicator does with an event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Rotate,
    FormatDescription,
    Heartbeat,
    /// MySQL GTID / anonymous GTID / tagged GTID: a transaction begins.
    MysqlGtid,
    MariadbGtid,
    Query,
    /// `LOAD DATA` logged in statement format (its text names the table).
    ExecuteLoadQuery,
    TableMap,
    Rows,
    Xid,
    XaPrepare,
    /// A compressed transaction (MySQL `binlog_transaction_compression`).
    TransactionPayload,
    /// Carries nothing tailcache needs; the reason is logged once and the
    /// event counted.
    Ignore(&'static str),
    /// The server lost events (INCIDENT): the replica can no longer be
    /// trusted to follow the binlog.
    Incident,
    /// tailcache cannot apply this event; the message says what to do.
    Unsupported(&'static str),
}

pub use crate::event_type::name;

const OLD_SERVER: &str = "it is only written by MySQL servers older than 5.0; tailcache needs MySQL 5.7+/MariaDB 10.3+ with binlog_format=ROW";
const COMPRESSED_MARIADB: &str = "MariaDB binlog compression (log_bin_compress=ON) is not supported; set log_bin_compress=OFF in my.cnf and restart the server";

pub fn classify(raw: u8) -> Handling {
    use Handling::*;
    match raw {
        4 => Rotate,
        15 => FormatDescription,
        27 | 41 => Heartbeat,
        33 | 34 | 42 => MysqlGtid,
        162 => MariadbGtid,
        2 => Query,
        18 => ExecuteLoadQuery,
        19 => TableMap,
        23..=25 | 30..=32 | 39 => Rows,
        16 => Xid,
        38 => XaPrepare,
        40 => TransactionPayload,
        26 => Incident,
        // Context of a statement-format statement; the statement itself
        // (a QUERY event) is what we act on.
        5 | 13 | 14 => {
            Ignore("context of a statement logged in statement format; the QUERY event that follows is handled")
        }
        // The file data of a statement-format LOAD DATA; EXECUTE_LOAD_QUERY
        // names the table and is handled.
        17 | 9 | 11 => Ignore("data of a statement-format LOAD DATA; its EXECUTE_LOAD_QUERY event is handled"),
        3 => Ignore("the server stopped; the next file's events follow"),
        28 => Ignore("ignorable by definition (LOG_EVENT_IGNORABLE)"),
        29 | 160 => Ignore("the statement text of the row events that follow; informational"),
        35 | 163 => Ignore("GTIDs already in earlier files; positions are tracked by file and offset"),
        161 => Ignore("a binlog checkpoint for crash recovery of the server"),
        36 | 37 => Ignore("group replication bookkeeping"),
        164 => Ignore("the server decrypts events before sending them to replicas"),
        1 | 6 | 7 | 8 | 10 | 12 | 20..=22 => Unsupported(OLD_SERVER),
        165..=171 => Unsupported(COMPRESSED_MARIADB),
        0 | 43..=159 | 172..=255 => {
            Unsupported("an event type this version of tailcache does not know; upgrade tailcache or report it")
        }
    }
}

/// Parses the xid of an `XA START|END|PREPARE|COMMIT|ROLLBACK` statement's
/// text into a canonical form: `gtrid-hex,bqual-hex,formatID`.
/// Returns `None` when `sql` is not an XA statement; otherwise the verb
/// (upper case) and the xid.
pub fn parse_xa(sql: &str) -> Option<(String, Option<String>)> {
    let s = sql.trim_start();
    if s.len() < 3 || !s[..3].eq_ignore_ascii_case("XA ") {
        return None;
    }
    let rest = s[3..].trim_start();
    let verb_end = rest.find(|c: char| c.is_ascii_whitespace()).unwrap_or(rest.len());
    let verb = rest[..verb_end].to_ascii_uppercase();
    let mut rest = rest[verb_end..].trim();
    // XA START may be `XA BEGIN`; XA START/END may carry JOIN/RESUME/SUSPEND
    // and XA COMMIT may end in ONE PHASE: only the xid matters here.
    for suffix in ["ONE PHASE", "JOIN", "RESUME", "SUSPEND FOR MIGRATE", "SUSPEND"] {
        if rest.len() >= suffix.len() && rest[rest.len() - suffix.len()..].eq_ignore_ascii_case(suffix) {
            rest = rest[..rest.len() - suffix.len()].trim_end();
        }
    }
    Some((verb, canonical_xid(rest)))
}

fn canonical_xid(text: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut format_id: Option<String> = None;
    let b = text.as_bytes();
    let mut i = 0;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b',' => i += 1,
            b'\'' | b'"' => {
                let q = b[i];
                let mut s = Vec::new();
                i += 1;
                while i < b.len() {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        s.push(b[i + 1]);
                        i += 2;
                    } else if b[i] == q && b.get(i + 1) == Some(&q) {
                        s.push(q);
                        i += 2;
                    } else if b[i] == q {
                        i += 1;
                        break;
                    } else {
                        s.push(b[i]);
                        i += 1;
                    }
                }
                parts.push(hex(&s));
            }
            b'X' | b'x' if b.get(i + 1) == Some(&b'\'') => {
                let start = i + 2;
                let end = start + text[start..].find('\'')?;
                parts.push(text[start..end].to_ascii_lowercase());
                i = end + 1;
            }
            b'0' if matches!(b.get(i + 1), Some(b'x' | b'X')) => {
                let start = i + 2;
                let mut end = start;
                while end < b.len() && b[end].is_ascii_hexdigit() {
                    end += 1;
                }
                parts.push(text[start..end].to_ascii_lowercase());
                i = end;
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                format_id = Some(text[start..i].to_owned());
            }
            _ => return None,
        }
    }
    let gtrid = parts.first()?.clone();
    let bqual = parts.get(1).cloned().unwrap_or_default();
    Some(format!("{gtrid},{bqual},{}", format_id.unwrap_or_else(|| "1".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_a_handling() {
        for raw in 0..=255u8 {
            // Exhaustive by construction; this documents that no type panics
            // and that known names are never classified as unknown.
            let h = classify(raw);
            if name(raw) != "UNKNOWN_TYPE" && raw != 0 {
                assert!(
                    !matches!(h, Handling::Unsupported(m) if m.contains("does not know")),
                    "{raw} {} is known",
                    name(raw)
                );
            }
        }
        assert_eq!(classify(39), Handling::Rows);
        assert_eq!(classify(38), Handling::XaPrepare);
        assert!(matches!(classify(200), Handling::Unsupported(_)));
    }

    #[test]
    fn table_map_names_are_read_from_the_bytes() {
        // id 0x0201, flags 1, `db`, `tbl`, then the column part.
        let body = [1, 2, 0, 0, 0, 0, 1, 0, 2, b'd', b'b', 0, 3, b't', b'b', b'l', 0, 1, 3, 0, 0];
        let m = table_map_names(&body).unwrap();
        assert_eq!(m.table_id, 0x201);
        assert_eq!(m.database, b"db");
        assert_eq!(m.table, b"tbl");
        assert_eq!(m.shape, &body[8..]);
        // Truncated anywhere in the names: None, not a panic.
        for n in 0..16 {
            assert!(table_map_names(&body[..n]).is_none(), "{n}");
        }
    }

    #[test]
    fn xids_spelled_differently_are_equal() {
        let a = parse_xa("XA START 'a1'").unwrap();
        let b = parse_xa("XA COMMIT X'6131',X'',1").unwrap();
        let c = parse_xa("xa commit 0x6131 ONE PHASE").unwrap();
        assert_eq!(a.0, "START");
        assert_eq!(b.0, "COMMIT");
        assert_eq!(a.1, b.1);
        assert_eq!(a.1, c.1);
        assert_eq!(a.1.as_deref(), Some("6131,,1"));
        let d = parse_xa("XA ROLLBACK 'g','b',7").unwrap();
        assert_eq!(d.1.as_deref(), Some("67,62,7"));
        assert_eq!(parse_xa("SELECT 1"), None);
        assert_eq!(parse_xa("XA END 'it''s'").unwrap().1.as_deref(), Some("69742773,,1"));
    }
}
