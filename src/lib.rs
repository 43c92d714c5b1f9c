//! tailcache: business-rule views of MySQL/MariaDB tables, kept in memcached
//! from committed binlog row images.
//!
//! Data flow (see DESIGN in the README): `source` (snapshot + binlog) →
//! `replica` (SQLite, one transaction per MySQL transaction, checkpoint in
//! the same transaction) → `views` (SQL over the replica, msgpack) → `sink`
//! (memcached).

pub mod admin;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod event_type;
pub mod failpoint;
pub mod instance;
pub mod metrics;
pub mod notify;
pub mod position;
pub mod replica;
pub mod schema;
pub mod sink;
pub mod source;
pub mod status;
pub mod views;

pub use error::{Error, Recovery, Result};
