//! Process limits a node needs: every moved connection is a descriptor, and
//! the usual soft limit of 1,024 open files is far below a busy service's
//! connection count (systemd units say `LimitNOFILE=` for the same reason).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Why the open-file limit could not be raised far enough.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("reading the open-file limit: {0}")]
    Read(nix::Error),
    #[error("raising the open-file limit to {wanted} (hard limit {hard}): {source}")]
    Raise {
        wanted: u64,
        hard: u64,
        source: nix::Error,
    },
}

/// Raises this process's open-file limit towards `wanted` descriptors,
/// as far as it may (the hard limit too where permitted), and never lowers
/// it. Children inherit it. Returns the soft limit now in force: below
/// `wanted` when the hard limit could not be raised.
pub fn raise_fd_limit(wanted: u64) -> Result<u64, LimitError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(LimitError::Read)?;
    if soft >= wanted {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, hard.max(wanted)).is_ok() {
        return Ok(wanted);
    }
    // Not allowed past the hard limit: up to it, then.
    let reachable = wanted.min(hard);
    if reachable > soft {
        setrlimit(Resource::RLIMIT_NOFILE, reachable, hard).map_err(|source| {
            LimitError::Raise {
                wanted: reachable,
                hard,
                source,
            }
        })?;
    }
    Ok(reachable.max(soft))
}

/// Nice value of the threads that keep a node's leases and elections: the
/// replicated log's heartbeats must not wait behind the data path, or a
/// loaded primary looks dead (corosync runs its totem thread at real-time
/// priority for the same reason; a strong CFS weight is the milder lever).
pub const HEARTBEAT_NICE: i32 = -10;

/// Gives the calling thread [`HEARTBEAT_NICE`] (Linux nice values are per
/// thread). Needs CAP_SYS_NICE to go below 0; returns the error otherwise,
/// and the thread keeps its priority.
pub fn prioritise_this_thread() -> std::io::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // integer arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, HEARTBEAT_NICE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_raised_and_never_lowered() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raise_fd_limit(1).unwrap(), soft);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (soft, hard));
        if soft < hard {
            assert_eq!(raise_fd_limit(hard).unwrap(), hard);
            assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, hard);
        }
    }
}
