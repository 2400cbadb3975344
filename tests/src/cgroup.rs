//! RAII cgroup v2 directories for socket-level tests.
//!
//! Socket hooks (`cgroup/connect4`, `sendmsg4`, ...) only run for processes
//! that are members of the cgroup they are attached to (or of one below it).
//! A [`Cgroup`] is a fresh, uniquely named directory
//! `<cgroup2 mount>/proxy-tests/<pid>-<n>-<label>`; test clients are moved
//! into it as whole processes (cgroup v2 moves processes, not threads).
//!
//! Dropping a [`Cgroup`] (also during a panic unwind) kills whatever is still
//! inside (`cgroup.kill`, or SIGKILL per pid on kernels without it) and
//! removes the directory. Nothing else of the machine's cgroup tree is
//! touched: no controllers are enabled, nothing is attached anywhere.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Directory below the cgroup2 mount holding every test cgroup.
pub const PARENT_DIR: &str = "proxy-tests";

/// Longest label kept in a cgroup name.
const MAX_LABEL: usize = 24;
/// How long [`Drop`] waits for killed members to exit before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// Where cgroup v2 is mounted (the first `cgroup2` entry of `/proc/mounts`;
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    parse_cgroup2_mount(&mounts).context("no cgroup2 filesystem in /proc/mounts")
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes spaces etc. as octal; mount points of cgroup2
        // never need that in practice, but keep the common one right.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// A cgroup v2 directory created for one test, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<mount>/proxy-tests/<pid>-<n>-<label>`. `label` is only for
    /// humans (sanitised and truncated).
    pub fn new(label: &str) -> Result<Cgroup> {
        let parent = cgroup2_mount()?.join(PARENT_DIR);
        match fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", parent.display()));
            }
        }
        STALE_CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale() {
                eprintln!("cgroup: stale cgroup cleanup failed: {e:#}");
            }
        });
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(MAX_LABEL)
            .collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{}-{n}-{label}", std::process::id()));
        if path.exists() {
            // Only possible when a dead process with our pid leaked it.
            remove(&path)?;
        }
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// The cgroup directory (what `--cgroup-path` takes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs` of this cgroup: write a pid there to move a process in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        fs::write(self.procs_file(), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", self.path.display()))
    }

    /// Pids of the processes currently in this cgroup.
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.path) {
            eprintln!("cgroup: {e:#}");
        }
    }
}

fn read_procs(dir: &Path) -> Result<Vec<u32>> {
    let file = dir.join("cgroup.procs");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kills the members of `dir` (a leaf we created), waits for them to leave
/// and removes the directory.
fn remove(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let procs = match read_procs(dir) {
            Ok(p) => p,
            // Already gone.
            Err(_) if !dir.exists() => return Ok(()),
            Err(e) => return Err(e),
        };
        if procs.is_empty() {
            match fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // EBUSY while killed members are still exiting: retry.
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("removing cgroup {}", dir.display()));
                }
                Err(_) => {}
            }
        } else if fs::write(dir.join("cgroup.kill"), "1").is_err() {
            // Kernels before 5.14 have no cgroup.kill.
            for pid in &procs {
                if let Ok(pid) = libc::pid_t::try_from(*pid) {
                    // SAFETY: kill(2) of a member of a cgroup this harness
                    // created; only our own client processes enter it.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "cgroup {} still has members {procs:?} after {DRAIN_TIMEOUT:?}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes test cgroups left behind by harness processes that no longer
/// exist. Returns the removed paths. Runs once per process before the first
/// [`Cgroup::new`].
pub fn cleanup_stale() -> Result<Vec<PathBuf>> {
    let parent = cgroup2_mount()?.join(PARENT_DIR);
    let dir = match fs::read_dir(&parent) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("listing {}", parent.display())),
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        if path.is_dir() && remove(&path).is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// The cgroup v2 path of a process (`0::/...` line of `/proc/PID/cgroup`),
/// relative to the cgroup2 mount.
pub fn cgroup_of(pid: u32) -> Result<String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .with_context(|| format!("no cgroup v2 entry in {file}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn mount_is_parsed() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                 cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
        assert!(cgroup2_mount().expect("cgroup2 mounted").is_dir());
    }

    #[test]
    fn create_join_and_drop_kills_members() {
        let cg = Cgroup::new("we/ird label").expect("create");
        let name = cg.path().file_name().expect("name").to_string_lossy();
        assert!(name.ends_with("we-ird-label"), "{name}");
        assert!(
            name.starts_with(&format!("{}-", std::process::id())),
            "{name}"
        );
        let other = Cgroup::new("we/ird label").expect("create");
        assert_ne!(cg.path(), other.path());

        // A process that moves itself in before exec'ing, as the scenario
        // helpers do.
        let script = format!("echo $$ > {} && exec sleep 30", cg.procs_file().display());
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !cg.procs().expect("procs").contains(&pid) {
            assert!(Instant::now() < deadline, "child never joined");
            std::thread::sleep(Duration::from_millis(10));
        }
        let rel = cgroup_of(pid).expect("cgroup_of");
        assert!(cg.path().ends_with(rel.trim_start_matches('/')), "{rel}");
        // Not us: the test process stays where it was.
        assert_ne!(cgroup_of(std::process::id()).expect("self"), rel);

        let path = cg.path().to_owned();
        drop(cg);
        assert!(!path.exists(), "cgroup not removed");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "member was killed: {status}");
    }

    #[test]
    fn dropped_during_panic() {
        let captured = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let cg = Cgroup::new("panic").expect("create");
            *captured.lock().unwrap_or_else(|p| p.into_inner()) = Some(cg.path().to_owned());
            panic!("test failure with a cgroup");
        }));
        assert!(r.is_err());
        let path = captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("path");
        assert!(!path.exists());
    }

    #[test]
    fn stale_cgroups_are_removed() {
        let parent = cgroup2_mount().expect("mount").join(PARENT_DIR);
        // Make sure the parent exists.
        let _keep = Cgroup::new("keep").expect("create");
        // Above the kernel's maximum pid (2^22), so never alive.
        let stale = parent.join(format!("4194305-0-stale{}", std::process::id()));
        fs::create_dir(&stale).expect("mkdir stale");
        let removed = cleanup_stale().expect("cleanup");
        assert!(!stale.exists(), "{removed:?}");
        assert!(_keep.path().exists(), "our own cgroups survive");
    }
}
