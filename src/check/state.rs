//! The state file: its directory must exist and be writable by the user
//! running the check (SQLite creates the file and its WAL and journal files
//! next to it).

use std::path::Path;

use super::Report;

/// One line, `state.path`.
pub fn check(path: &str, r: &mut Report) {
    if path == ":memory:" {
        r.ok_line("state.path", ":memory: (nothing kept across restarts)");
        return;
    }
    let file = Path::new(path);
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let user = current_user();
    if !dir.is_dir() {
        r.problem(
            "state.path",
            format!("directory {} does not exist", dir.display()),
            format!("an existing directory writable by {user}"),
            format!("mkdir -p {} && chown {user} {}", dir.display(), dir.display()),
        );
        return;
    }
    let probe = dir.join(format!(".tailcache-check-{}", std::process::id()));
    let writable = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).map(|_| ());
    let _ = std::fs::remove_file(&probe);
    if let Err(e) = writable {
        r.problem(
            "state.path",
            format!("cannot create files in {}: {e}", dir.display()),
            format!("a directory writable by {user} (SQLite creates the state file and its -wal/-shm files there)"),
            format!("chown {user} {} (or choose another state.path)", dir.display()),
        );
        return;
    }
    if file.exists() {
        if let Err(e) = std::fs::OpenOptions::new().append(true).open(file) {
            r.problem(
                "state.path",
                format!("{path} exists but cannot be opened for writing: {e}"),
                format!("a state file writable by {user}"),
                format!("chown {user} {path}"),
            );
            return;
        }
    }
    r.ok_line("state.path", format!("{} is writable by {user}", dir.display()))
}

/// The user name (or uid) running the check, for the messages.
fn current_user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "the tailcache user".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_checks() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Report::default();
        check(dir.path().join("state.db").to_str().unwrap(), &mut r);
        assert!(r.ok(), "{r}");
        let mut r = Report::default();
        check(dir.path().join("missing/state.db").to_str().unwrap(), &mut r);
        let text = r.render();
        assert!(text.starts_with("FAIL state.path: found directory") && text.contains("does not exist"), "{text}");
        let mut r = Report::default();
        check(":memory:", &mut r);
        assert!(r.ok());
    }
}
