//! Binlog coordinates as their own types.
//!
//! A position is where the *next* event starts (the `log_pos` of the last
//! event we consumed), so resuming from a stored position never re-reads the
//! transaction that produced it.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// A binlog file and byte offset, e.g. `mysql-bin.000042:1337`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BinlogPosition {
    pub file: String,
    pub pos: u64,
}

impl BinlogPosition {
    pub fn new(file: impl Into<String>, pos: u64) -> Self {
        Self { file: file.into(), pos }
    }

    /// Splits `mysql-bin.000042` into (`mysql-bin`, 42) so that `.1000000`
    /// sorts after `.999999` even though it is longer.
    fn file_key(&self) -> (&str, u64, &str) {
        match self.file.rsplit_once('.') {
            Some((stem, ext)) => match ext.parse::<u64>() {
                Ok(n) => (stem, n, ""),
                Err(_) => (self.file.as_str(), 0, ""),
            },
            None => (self.file.as_str(), 0, ""),
        }
    }
}

impl Ord for BinlogPosition {
    fn cmp(&self, other: &Self) -> Ordering {
        self.file_key()
            .cmp(&other.file_key())
            .then_with(|| self.file.cmp(&other.file))
            .then_with(|| self.pos.cmp(&other.pos))
    }
}

impl PartialOrd for BinlogPosition {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for BinlogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid binlog position {found:?}: expected FILE:OFFSET, e.g. mysql-bin.000042:1337")]
pub struct ParsePositionError {
    pub found: String,
}

impl FromStr for BinlogPosition {
    type Err = ParsePositionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError { found: s.to_owned() };
        let (file, pos) = s.rsplit_once(':').ok_or_else(err)?;
        if file.is_empty() || file.contains(['/', '\\']) {
            return Err(err());
        }
        let pos = pos.parse().map_err(|_| err())?;
        Ok(Self::new(file, pos))
    }
}

/// A global transaction id: MariaDB `domain-server-seq` or MySQL `uuid:gno`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Gtid {
    MariaDb { domain: u32, server_id: u32, seq: u64 },
    Mysql { uuid: [u8; 16], gno: u64 },
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gtid::MariaDb { domain, server_id, seq } => write!(f, "{domain}-{server_id}-{seq}"),
            Gtid::Mysql { uuid, gno } => {
                for (i, b) in uuid.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{b:02x}")?;
                }
                write!(f, ":{gno}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid GTID {found:?}: expected DOMAIN-SERVER-SEQ (MariaDB) or UUID:NUMBER (MySQL)")]
pub struct ParseGtidError {
    pub found: String,
}

impl FromStr for Gtid {
    type Err = ParseGtidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseGtidError { found: s.to_owned() };
        if let Some((uuid, gno)) = s.rsplit_once(':') {
            let hex: String = uuid.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 || uuid.len() != 36 {
                return Err(err());
            }
            let mut bytes = [0u8; 16];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2).ok_or_else(err)?, 16).map_err(|_| err())?;
            }
            return Ok(Gtid::Mysql { uuid: bytes, gno: gno.parse().map_err(|_| err())? });
        }
        let mut parts = s.split('-');
        let (Some(d), Some(sv), Some(q), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(err());
        };
        Ok(Gtid::MariaDb {
            domain: d.parse().map_err(|_| err())?,
            server_id: sv.parse().map_err(|_| err())?,
            seq: q.parse().map_err(|_| err())?,
        })
    }
}

/// Where the replica stands: the position after the last applied
/// transaction, and that transaction's GTID when the server sent one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: BinlogPosition,
    pub gtid: Option<Gtid>,
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.gtid {
            Some(g) => write!(f, "{} (gtid {g})", self.position),
            None => write!(f, "{}", self.position),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trips() {
        for s in ["mysql-bin.000001:4", "mariadb-bin.123456:98765", "binlog.1000000:0"] {
            let p: BinlogPosition = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn position_orders_by_file_number_then_offset() {
        let p = |s: &str| s.parse::<BinlogPosition>().unwrap();
        assert!(p("mysql-bin.000001:900") < p("mysql-bin.000002:4"));
        assert!(p("mysql-bin.999999:4") < p("mysql-bin.1000000:4"));
        assert!(p("mysql-bin.000002:4") < p("mysql-bin.000002:5"));
    }

    #[test]
    fn position_rejects_garbage() {
        for s in ["", "mysql-bin.000001", ":4", "mysql-bin.000001:x", "a/b.1:4"] {
            assert!(s.parse::<BinlogPosition>().is_err(), "{s}");
        }
    }

    #[test]
    fn gtid_round_trips() {
        for s in ["0-1-42", "12-4001-18446744073709551615", "3e11fa47-71ca-11e1-9e33-c80aa9429562:23"] {
            let g: Gtid = s.parse().unwrap();
            assert_eq!(g.to_string(), s);
        }
        assert!("1-2".parse::<Gtid>().is_err());
        assert!("zz:1".parse::<Gtid>().is_err());
    }
}
