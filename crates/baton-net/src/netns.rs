//! Network namespaces: entering one from a thread, and spawning processes in one.
//!
//! A socket belongs to the namespace of the thread that created it, so code
//! that must act "on a host" of the lab (or on the node's own namespace) runs
//! on a thread that has joined that namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{setns, unshare, CloneFlags};

/// Errors from namespace operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (needs root / CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot create a private network namespace: {0} (needs root / CAP_SYS_ADMIN)")]
    Unshare(nix::Error),
    #[error("thread running in namespace {0} panicked")]
    Panicked(String),
}

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Path of a named namespace as created by `ip netns add NAME`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Moves the calling thread into the namespace at `path`. The thread stays
/// there; use [`run_in`] to confine it to a scoped thread.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_owned(),
        source,
    })
}

/// Runs `f` on a new thread inside the namespace at `path` and returns its
/// result. The caller's thread never changes namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let owned = path.to_owned();
    let handle = std::thread::Builder::new()
        .name(format!(
            "netns-{}",
            owned.file_name().unwrap_or_default().to_string_lossy()
        ))
        .spawn(move || -> Result<T, NetnsError> {
            enter(&owned)?;
            Ok(f())
        })
        .expect("spawning a thread");
    handle
        .join()
        .map_err(|_| NetnsError::Panicked(path.display().to_string()))?
}

/// Spawns a thread inside the namespace at `path`, running `f`; the caller
/// joins it. Used for long-running per-host agents in tests and the lab.
pub fn spawn_in<T, F>(path: &Path, f: F) -> std::thread::JoinHandle<Result<T, NetnsError>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let owned = path.to_owned();
    std::thread::Builder::new()
        .name(format!(
            "netns-{}",
            owned.file_name().unwrap_or_default().to_string_lossy()
        ))
        .spawn(move || -> Result<T, NetnsError> {
            enter(&owned)?;
            Ok(f())
        })
        .expect("spawning a thread")
}

/// Moves the calling thread into a new, private network namespace (only
/// `lo`, down). For unit tests of socket code that must not touch the
/// machine's own network.
pub fn unshare_private() -> Result<(), NetnsError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare)
}

/// A `Command` that runs `program` inside the named namespace, through
/// `ip netns exec` (which also gives it a matching /sys).
pub fn command_in(name: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name, program]);
    cmd
}

/// Whether this process has CAP_NET_ADMIN and CAP_SYS_ADMIN, which creating
/// and entering namespaces, repairing sockets and changing addresses need.
pub fn has_admin_capabilities() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0 && caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Identity (device, inode) of a namespace file.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Inode of the initial network namespace on kernels that give it a fixed
/// one (`PROC_NET_INIT_INO`); dynamic ones start at 0xF0000000.
const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;

/// Whether the calling thread is in the machine's initial network namespace:
/// the one of PID 1, or when PID 1's is not readable (a hardened or foreign
/// init), the one of PID 2 (kthreadd, a kernel thread, always in the initial
/// one). Code that changes network configuration refuses to run there.
pub fn in_root_namespace() -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/thread-self/ns/net")?;
    if me.ino() == PROC_NET_INIT_INO {
        return Ok(true);
    }
    let mut first_err = None;
    for reference in ["/proc/1/ns/net", "/proc/2/ns/net"] {
        match std::fs::metadata(reference) {
            Ok(init) => return Ok(me.ino() == init.ino() && me.dev() == init.dev()),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.expect("two references tried"))
}

/// Identity of the calling thread's network namespace (its inode), to tell
/// apart state that several lab nodes keep in one process.
pub fn current_id() -> Option<u64> {
    ns_id(Path::new("/proc/thread-self/ns/net")).map(|(_, ino)| ino)
}

/// Ids of the processes whose network namespace is the one at `path`.
pub fn pids_in(path: &Path) -> Vec<u32> {
    let Some(target) = ns_id(path) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            ns_id(&Path::new("/proc").join(pid.to_string()).join("ns/net")) == Some(target)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Sends SIGTERM to process `pid` (a clean stop). Errors (already gone)
/// are ignored.
pub fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM);
    }
}

/// Sends SIGKILL to process `pid`. Errors (already gone) are ignored.
pub fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}
