//! One writer per output: a lock file beside the output holds the writer's pid. A second
//! writer is refused while that process lives; the lock of a process that died is taken over.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{out} is being written by another sae process (pid {pid}, lock file {lock}); wait for it to finish, or choose another --out"
    )]
    Held {
        out: PathBuf,
        pid: u32,
        lock: PathBuf,
    },
    #[error("locking {out} (lock file {lock}): {source}")]
    Io {
        out: PathBuf,
        lock: PathBuf,
        source: std::io::Error,
    },
}

/// Held while a command writes an output; the lock file goes when this is dropped.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
}

/// `.NAME.lock` beside `out`.
pub fn lock_path(out: &Path) -> std::io::Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a directory name", out.display()),
        )
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{}.lock", name.to_string_lossy())))
}

fn alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // Signal 0 checks that the process exists; EPERM means it does, owned by someone else.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl OutputLock {
    /// Locks `out` for this process, creating its parent directory if needed.
    pub fn acquire(out: &Path) -> Result<OutputLock, LockError> {
        let lock = lock_path(out).map_err(|source| LockError::Io {
            out: out.to_path_buf(),
            lock: PathBuf::new(),
            source,
        })?;
        let io = |source| LockError::Io {
            out: out.to_path_buf(),
            lock: lock.clone(),
            source,
        };
        if let Some(parent) = lock.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let me = std::process::id();
        // The pid is written to a private file first and linked into place, so the lock
        // file never exists without its pid.
        let mine = lock.with_file_name(format!(
            "{}.{me}",
            lock.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut f = std::fs::File::create(&mine).map_err(io)?;
        writeln!(f, "{me}").and_then(|_| f.sync_all()).map_err(io)?;
        drop(f);
        let result = (|| {
            for _ in 0..3 {
                match std::fs::hard_link(&mine, &lock) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io(e)),
                }
                match read_pid(&lock) {
                    Some(pid) if pid == me => return Ok(()),
                    Some(pid) if alive(pid) => {
                        return Err(LockError::Held {
                            out: out.to_path_buf(),
                            pid,
                            lock: lock.clone(),
                        })
                    }
                    // A dead holder (or an unreadable lock): move it aside and retry. Only
                    // the stale file is removed; a live lock that won the race is put back.
                    stale => {
                        let aside = lock.with_file_name(format!(
                            "{}.stale-{me}",
                            lock.file_name().unwrap_or_default().to_string_lossy()
                        ));
                        if std::fs::rename(&lock, &aside).is_ok() {
                            let moved = read_pid(&aside);
                            if moved != stale && moved.is_some_and(alive) {
                                let _ = std::fs::hard_link(&aside, &lock);
                            }
                            let _ = std::fs::remove_file(&aside);
                        }
                    }
                }
            }
            match read_pid(&lock) {
                Some(pid) => Err(LockError::Held {
                    out: out.to_path_buf(),
                    pid,
                    lock: lock.clone(),
                }),
                None => Err(io(std::io::Error::other(
                    "the lock file keeps changing; another process is starting on this output",
                ))),
            }
        })();
        let _ = std::fs::remove_file(&mine);
        result.map(|()| OutputLock { path: lock })
    }

    /// Like [`OutputLock::acquire`], but waits (up to `patience`) while another live process
    /// holds the lock: for shared work such as filling a cache, which the other process may
    /// be doing right now.
    pub fn wait(out: &Path, patience: std::time::Duration) -> Result<OutputLock, LockError> {
        let t0 = std::time::Instant::now();
        let mut said = false;
        loop {
            match Self::acquire(out) {
                Err(LockError::Held { pid, .. }) if t0.elapsed() < patience => {
                    if !said {
                        eprintln!(
                            "waiting for process {pid}, which is writing {}",
                            out.display()
                        );
                        said = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(250));
                }
                r => return r,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if read_pid(&self.path) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_refuses_a_second_writer_and_a_dead_ones_lock_is_taken_over() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("run");
        let lock = lock_path(&out).unwrap();
        // pid 1 is always alive.
        std::fs::write(&lock, "1\n").unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(matches!(e, LockError::Held { pid: 1, .. }), "{e}");
        assert!(e.to_string().contains("pid 1"), "{e}");
        // A pid that cannot be running.
        std::fs::write(&lock, format!("{}\n", i32::MAX)).unwrap();
        let held = OutputLock::acquire(&out).unwrap();
        assert_eq!(read_pid(&lock), Some(std::process::id()));
        drop(held);
        assert!(!lock.exists());
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            0,
            "no files left"
        );
    }

    #[test]
    fn a_running_process_holds_the_lock_until_it_dies() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("run");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(lock_path(&out).unwrap(), format!("{}\n", child.id())).unwrap();
        let e = OutputLock::acquire(&out).unwrap_err();
        assert!(
            e.to_string().contains(&format!("pid {}", child.id())),
            "{e}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let held = OutputLock::acquire(&out).unwrap();
        assert_eq!(read_pid(held.path()), Some(std::process::id()));
    }
}
