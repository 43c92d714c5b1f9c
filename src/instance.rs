//! One daemon per state file: an exclusive, non-blocking lock on
//! `<state>.lock`, held for the process's whole life, with the holder's pid
//! written into it (information for the next one that tries).

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file next to the state file: `state.db` → `state.db.lock`.
pub fn lock_path(state: &Path) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Held while the daemon runs; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    pub path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock or fails at once, naming the state file and the pid
    /// of the process that holds it.
    pub fn acquire(state: &Path) -> Result<InstanceLock> {
        let path = lock_path(state);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Fatal(format!("cannot open the lock file {}: {e}", path.display())))?;
        // Through fs4 (flock): std's inherent File::try_lock needs Rust 1.89.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "a process that has not written its pid yet".to_owned(),
                };
                return Err(Error::Fatal(format!(
                    "state.path {} is in use by another tailcache ({holder}, lock {}); stop it first, or give this instance its own state.path",
                    state.display(),
                    path.display()
                )));
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(Error::Fatal(format!("cannot lock {}: {e}", path.display())));
            }
        }
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())?;
            f.flush()
        };
        write(&mut file).map_err(|e| Error::Fatal(format!("cannot write the lock file {}: {e}", path.display())))?;
        Ok(InstanceLock { file, path })
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // The file stays (removing it would let two processes lock two
        // different files); only the stale pid goes, while still locked.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_naming_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.db");
        let first = InstanceLock::acquire(&state).unwrap();
        assert_eq!(std::fs::read_to_string(&first.path).unwrap().trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open in
        // the same process conflicts like another process would.
        let e = InstanceLock::acquire(&state).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains(&state.display().to_string()), "{e}");
        drop(first);
        let again = InstanceLock::acquire(&state).unwrap();
        drop(again);
    }
}
