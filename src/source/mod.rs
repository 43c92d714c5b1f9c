//! The MySQL side: connections, snapshots and the binlog stream.

pub mod catalog;
pub mod charset;
pub mod conn;
pub mod ddl;
pub mod decode;
pub mod events;
pub mod json_diff;
pub mod replicator;
pub mod retry;
pub mod server;
pub mod snapshot;
