//! One integration-test binary so the MariaDB harness starts once per run.
mod admin;
mod check;
mod decode_fixtures;
mod enumerate;
mod events;
mod harness;
mod harness_selftest;
mod ops;
mod readers;
mod replica;
mod restart;
mod resync;
mod sink;
mod snapshot;
mod systemd;
mod tls;
mod views;
