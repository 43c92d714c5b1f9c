//! Crash points for the crash tests, with the `fail` crate, compiled in
//! only with the `failpoints` feature (`scripts/test.sh` builds with it; a
//! release build has none, and [`failpoint!`](macro@crate::failpoint) expands to
//! nothing).
//!
//! Each point is named after the step it follows. The process reads the
//! `FAILPOINTS` variable at start ([`setup`]); `FAILPOINTS=<name>=return`
//! (or `<name>=2*off->return` for the third time the point is reached)
//! makes it print `crash point <name> reached` on stderr and abort right
//! there, like `kill -9`: no destructor runs, nothing is flushed. The crash
//! tests (tests/it/crash.rs) crash at each point in turn and check that
//! memcached ends up exactly as the views say.

/// Every crash point, in the order a commit meets them. The crash tests
/// assert each is reached.
pub const POINTS: &[&str] = &[
    "snapshot.mid_table",
    "replica.after_commit",
    "xa.after_stage",
    "publish.after_doubt_mark",
    "publish.after_ack",
    "publish.between_pieces",
    "publish.mid_deletes",
];

/// Points where the crash tests only wait (`<name>=sleep(<ms>)`), to
/// order the daemon's threads.
pub const DELAYS: &[&str] = &["publish.start"];

/// Whether this build has crash points (the crash tests refuse to run
/// without: a test that cannot crash must not pass).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Reads `FAILPOINTS`; kept for the life of the process.
#[cfg(feature = "failpoints")]
pub fn setup() -> Option<fail::FailScenario<'static>> {
    Some(fail::FailScenario::setup())
}

#[cfg(not(feature = "failpoints"))]
pub fn setup() -> Option<()> {
    None
}

/// What a crash point does when its action fires.
#[cfg(feature = "failpoints")]
pub fn crash(name: &str) -> ! {
    eprintln!("crash point {name} reached");
    std::process::abort()
}

/// Marks a crash point (see the module docs); nothing without the
/// `failpoints` feature.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        {
            let _: Option<()> = fail::eval($name, |_| $crate::failpoint::crash($name));
        }
    };
}
