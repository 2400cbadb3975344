//! RAII network namespaces and a way to run code inside them.
//!
//! A [`Netns`] is a named namespace (`ip netns add`) that is deleted again
//! (`ip netns del`) when the value is dropped, including during a panic
//! unwind. Names embed the process id and a process-wide counter, so tests
//! running in parallel threads or processes never collide.
//!
//! Code runs inside a namespace in two ways:
//! * [`Netns::exec`] / [`Netns::command`]: a process under `ip netns exec`;
//! * [`Netns::run`]: a closure on a fresh thread that has `setns(2)`'d into
//!   the namespace. Sockets created there belong to the namespace for their
//!   whole life, so they can be handed to ordinary threads afterwards.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};

use anyhow::{Context as _, Result, bail};

/// Prefix of every namespace this harness creates (`kpt<pid>-<n>-<label>`).
pub const NAME_PREFIX: &str = "kpt";

/// Where `ip netns` keeps the namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Longest label kept in a namespace name (labels are truncated beyond it).
const MAX_LABEL: usize = 20;

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// `ip netns add` sets up the shared `/run/netns` mount on first use; two
/// concurrent first uses can race, so creation is serialised per process.
static CREATE_LOCK: Mutex<()> = Mutex::new(());
static STALE_CLEANUP: Once = Once::new();

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a uniquely named namespace with `lo` up.
    ///
    /// `label` is only for humans (it is sanitised and truncated); the name is
    /// `kpt<pid>-<counter>-<label>`, always shorter than 50 characters.
    pub fn new(label: &str) -> Result<Self> {
        STALE_CLEANUP.call_once(|| {
            if let Err(e) = cleanup_stale() {
                eprintln!("netns: stale namespace cleanup failed: {e:#}");
            }
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
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
        let name = format!("{NAME_PREFIX}{}-{n}-{label}", std::process::id());
        {
            let _guard = CREATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            if Path::new(NETNS_RUN_DIR).join(&name).exists() {
                // Only possible when a dead process with our pid leaked it.
                let _ = run_cmd(Command::new("ip").args(["netns", "del", &name]));
            }
            run_cmd(Command::new("ip").args(["netns", "add", &name]))
                .with_context(|| format!("creating network namespace {name}"))?;
        }
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])
            .with_context(|| format!("bringing lo up in {}", ns.name))?;
        Ok(ns)
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip netns exec NAME args...` and returns its stdout; a non-zero
    /// exit is an error carrying the command line and stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("exec: empty command line")?;
        run_cmd(self.command(program).args(rest))
    }

    /// Like [`Netns::exec`] but only reports whether the command succeeded.
    pub fn exec_ok(&self, args: &[&str]) -> bool {
        self.exec(args).is_ok()
    }

    /// A [`Command`] prefilled with `ip netns exec NAME program`, for spawning
    /// long-running processes inside the namespace (`ip netns exec` execs the
    /// program, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip -n NAME args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs a batch of `ip` commands (one per line, without the leading `ip`)
    /// in this namespace with a single `ip -n NAME -batch -` process.
    pub fn ip_batch(&self, script: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning `ip -batch` (is iproute2 installed?)")?;
        {
            let mut stdin = child.stdin.take().context("ip -batch: no stdin pipe")?;
            stdin
                .write_all(script.as_bytes())
                .context("writing the ip batch script")?;
        }
        let out = child.wait_with_output().context("waiting for ip -batch")?;
        if !out.status.success() {
            bail!(
                "`ip -n {} -batch -` failed ({}): {}\nscript:\n{script}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` on a fresh thread that has joined this namespace and returns
    /// its result. Sockets the closure creates belong to this namespace, and
    /// threads it spawns inherit the namespace. A panic in `f` is propagated.
    ///
    /// Only this thread switches: `/proc/net/*` (= `/proc/self/net`, the
    /// thread-group leader's view) still shows the root namespace; read
    /// `/proc/thread-self/net/*` instead. `/proc/sys/net` follows the thread.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("ns-{}", self.name))
                .spawn_scoped(s, move || -> Result<R> {
                    // SAFETY: plain syscall on a valid, open namespace fd; only
                    // this (fresh, short-lived) thread changes namespace.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("setns into {}", path.display()));
                    }
                    drop(file);
                    Ok(f())
                })
                .context("spawning a thread for Netns::run")?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Writes a sysctl inside this namespace. `key` is either dotted
    /// (`net.ipv4.ip_forward`) or a path below `/proc/sys`
    /// (`net/ipv4/conf/eth0.100/rp_filter`, for names containing dots).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Reads a sysctl inside this namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let v = self
            .run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("reading sysctl {key} in {}", self.name))?;
        Ok(v.trim().to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("netns: failed to delete {}: {e:#}", self.name);
        }
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.trim_start_matches('/').to_owned()
    } else {
        key.replace('.', "/")
    };
    Path::new("/proc/sys").join(rel)
}

/// Runs a command to completion; non-zero exit is an error with the command
/// line and stderr. Returns stdout.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all namespaces in `/run/netns`.
pub fn list_namespaces() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("listing {NETNS_RUN_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("listing {NETNS_RUN_DIR}"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes namespaces left behind by harness processes that no longer exist
/// (killed before their destructors ran). Returns the deleted names. Runs
/// automatically once per process before the first [`Netns::new`].
pub fn cleanup_stale() -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for name in list_namespaces()? {
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if run_cmd(Command::new("ip").args(["netns", "del", &name])).is_ok() {
            deleted.push(name);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    #[test]
    fn create_and_drop() {
        let ns = Netns::new("create-and-drop").expect("create netns");
        let name = ns.name().to_owned();
        assert!(name.len() < 50, "name too long: {name}");
        assert!(ns.path().exists());
        assert!(list_namespaces().expect("list").contains(&name));
        let links = ns
            .exec(&["ip", "-o", "link", "show", "lo"])
            .expect("exec ip");
        assert!(links.contains("UP"), "lo not up: {links}");
        drop(ns);
        assert!(!list_namespaces().expect("list").contains(&name));
    }

    #[test]
    fn names_are_unique_and_short() {
        let a = Netns::new("a-very-long-label-that-should-be-truncated").expect("a");
        let b = Netns::new("a-very-long-label-that-should-be-truncated").expect("b");
        assert_ne!(a.name(), b.name());
        assert!(a.name().len() < 50, "{}", a.name());
        let odd = Netns::new("we/ird name").expect("odd");
        assert!(odd.name().ends_with("we-ird-name"), "{}", odd.name());
    }

    #[test]
    fn exec_errors_carry_stderr_and_command() {
        let ns = Netns::new("exec-err").expect("create");
        let err = ns
            .exec(&["ip", "link", "show", "nosuchdev0"])
            .expect_err("should fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("nosuchdev0"), "{msg}");
        assert!(!ns.exec_ok(&["false"]));
        assert!(ns.exec_ok(&["true"]));
    }

    #[test]
    fn run_is_inside_namespace() {
        let ns = Netns::new("run").expect("create");
        // A listener on a fixed port inside the namespace does not clash with
        // one in another namespace (or the root one).
        let other = Netns::new("run-other").expect("create");
        let l1 = ns
            .run(|| TcpListener::bind("127.0.0.1:4242"))
            .expect("run")
            .expect("bind in ns");
        let l2 = other
            .run(|| TcpListener::bind("127.0.0.1:4242"))
            .expect("run")
            .expect("bind in other ns");
        // Only `lo` exists inside a fresh namespace. (`/proc/net` follows the
        // thread-group leader's namespace; `/proc/thread-self/net` is ours.)
        let links = ns
            .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
            .expect("run")
            .expect("read /proc/net/dev");
        let ifaces = links.lines().skip(2).count();
        assert_eq!(ifaces, 1, "{links}");
        // Threads spawned from inside inherit the namespace.
        let inner = ns
            .run(|| std::thread::spawn(|| UdpSocket::bind("127.0.0.1:4242")).join())
            .expect("run")
            .expect("join")
            .expect("bind udp");
        drop((l1, l2, inner));
    }

    #[test]
    fn run_propagates_panics() {
        let ns = Netns::new("run-panic").expect("create");
        let r = std::panic::catch_unwind(|| ns.run(|| panic!("boom")));
        assert!(r.is_err());
    }

    #[test]
    fn sysctl_roundtrip() {
        let ns = Netns::new("sysctl").expect("create");
        ns.sysctl("net.ipv4.ip_forward", "1").expect("set");
        assert_eq!(ns.read_sysctl("net.ipv4.ip_forward").expect("get"), "1");
        let other = Netns::new("sysctl-other").expect("create");
        assert_eq!(other.read_sysctl("net/ipv4/ip_forward").expect("get"), "0");
    }

    #[test]
    fn stale_namespaces_are_cleaned() {
        // Above the kernel's maximum pid (2^22), so never alive.
        let name = format!("{NAME_PREFIX}4194305-0-stale{}", std::process::id());
        // Another test process's cleanup may delete it even while `ip netns
        // add` is still binding it, so a failed add is fine: it is gone.
        let _ = run_cmd(Command::new("ip").args(["netns", "add", &name]));
        let _ = cleanup_stale().expect("cleanup");
        assert!(!list_namespaces().expect("list").contains(&name));
        // Our own namespaces survive.
        let ns = Netns::new("not-stale").expect("create");
        let _ = cleanup_stale().expect("cleanup");
        assert!(ns.path().exists());
    }

    #[test]
    fn batch() {
        let ns = Netns::new("batch").expect("create");
        ns.ip_batch(
            "link add d0 type veth peer name d1\nlink set d0 up\naddr add 192.0.2.1/24 dev d0\n",
        )
        .expect("batch");
        let out = ns.ip(&["-o", "addr", "show", "d0"]).expect("ip");
        assert!(out.contains("192.0.2.1/24"), "{out}");
        let err = ns.ip_batch("link add d0 type veth\n").expect_err("dup");
        assert!(format!("{err:#}").contains("batch"));
    }
}
