//! The real agent binary, run inside a node's namespace against the API
//! server fixture, and `proxyctl` against its pins. RAII: dropping an
//! [`Agent`] stops it and removes its pin directory.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    apiserver::ApiServer,
    cluster::{Node, POD_NETWORK},
};

/// Directory holding the workspace's built binaries (`target/debug`).
/// `PROXY_BIN_DIR` overrides it.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PROXY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug")
}

/// Path of a workspace binary, with a clear error if it was not built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build it first with `cargo build -p proxy --bins` (`cargo xtask test` does)",
            p.display()
        );
    }
    Ok(p)
}

/// A scratch directory for one test, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Result<Scratch> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "proxy-tests-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    pub node_name: String,
    pub bpffs_path: PathBuf,
    pub log_path: PathBuf,
    argv: Vec<std::ffi::OsString>,
    opts: AgentOptions,
    _scratch: Scratch,
}

/// Options for [`Agent::start`].
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Extra command-line arguments. Without `--socket-lb` the agent gets
    /// `--socket-lb false` (never the machine's root cgroup).
    pub args: Vec<String>,
    /// Wait for this log line before returning (None: don't wait).
    pub ready_line: Option<String>,
    pub ready_timeout: Duration,
    /// Run the agent with exactly these capabilities (Kubernetes'
    /// spelling, e.g. `NET_ADMIN`; see [`crate::privilege`]). None: as
    /// root with every capability, unless `PROXY_TESTS_MANIFEST_CAPS=1`,
    /// which gives every agent deploy/'s set.
    pub capabilities: Option<BTreeSet<String>>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            args: Vec::new(),
            ready_line: Some("caches synced".into()),
            ready_timeout: Duration::from_secs(20),
            capabilities: None,
        }
    }
}

impl Agent {
    /// Serve the fixture inside `node`'s namespace, write a kubeconfig for
    /// it and start `proxy` there (`--mode ebpf` unless the options say).
    ///
    /// Unless the test installed its own authorizer, `api` enforces
    /// deploy/'s ClusterRole from now on and fails the test if it refuses
    /// any request ([`crate::rbac::enforce_deploy_role`]).
    pub fn start(node: &Node, api: &ApiServer, opts: AgentOptions) -> Result<Agent> {
        crate::rbac::enforce_deploy_role(api)?;
        let scratch = Scratch::new(&format!("agent-{}", node.name))?;
        let listener = node
            .ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))?
            .context("binding the API server fixture in the node namespace")?;
        let addr = api.serve(listener)?;
        let kubeconfig = scratch.path().join("kubeconfig");
        ApiServer::write_kubeconfig(addr, &kubeconfig)?;
        let bpffs_path = PathBuf::from(format!(
            "/sys/fs/bpf/proxy-tests-{}",
            scratch
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("agent")
        ));
        let log_path = scratch.path().join("agent.log");
        // Tests never let socket LB default to the machine's root cgroup:
        // without an explicit --socket-lb, it is off.
        let mut args = opts.args.clone();
        if !args.iter().any(|a| a.starts_with("--socket-lb")) {
            args.extend(["--socket-lb".to_owned(), "false".to_owned()]);
        }
        // The test cluster's pod network, as a deployment passes its own
        // (the eBPF mode lets packets to it skip the frontend lookup).
        if !args.iter().any(|a| a.starts_with("--cluster-cidr")) {
            args.extend(["--cluster-cidr".to_owned(), POD_NETWORK.to_owned()]);
        }
        // nsenter, not `ip netns exec`: the latter remounts /sys, hiding
        // bpffs (a DaemonSet gets /sys/fs/bpf as a hostPath the same way).
        let capabilities = match &opts.capabilities {
            Some(c) => Some(c.clone()),
            None if std::env::var_os("PROXY_TESTS_MANIFEST_CAPS").is_some_and(|v| v == "1") => {
                Some(crate::privilege::agent_capabilities()?)
            }
            None => None,
        };
        let mut argv: Vec<std::ffi::OsString> = vec![
            format!("--net={}", node.ns.path().display()).into(),
            "--".into(),
        ];
        // nsenter (which needs SYS_ADMIN) first, then setpriv drops what
        // the manifest does not grant; each execs the next in place.
        if let Some(caps) = &capabilities {
            argv.push("setpriv".into());
            argv.extend(
                crate::privilege::setpriv_args(caps)
                    .into_iter()
                    .map(Into::into),
            );
        }
        argv.extend([
            binary("proxy")?.into(),
            "--kubeconfig".into(),
            kubeconfig.clone().into(),
            "--hostname-override".into(),
            node.name.clone().into(),
            "--bpffs-path".into(),
            bpffs_path.clone().into(),
        ]);
        if !args.iter().any(|a| a == "--mode") {
            argv.extend(["--mode".into(), "ebpf".into()]);
        }
        argv.extend(args.into_iter().map(Into::into));
        let mut agent = Agent {
            child: None,
            node_name: node.name.clone(),
            bpffs_path,
            log_path,
            argv,
            opts,
            _scratch: scratch,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new("nsenter")
            .args(&self.argv)
            .env("RUST_LOG", log_filter())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent")?;
        self.child = Some(child);
        if let Some(line) = self.opts.ready_line.clone() {
            let timeout = self.opts.ready_timeout;
            // Count only lines logged by this incarnation.
            let seen = self.log().matches(line.as_str()).count();
            self.wait_for_log_count(&line, seen + 1, timeout)?;
        }
        Ok(())
    }

    /// `kill -9` the agent (no clean shutdown) and start it again with the
    /// same flags and pin directory.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL")?;
            child.wait()?;
        }
        self.spawn()
    }

    /// The agent's process id (nsenter, and setpriv when capabilities are
    /// set, exec the agent without forking, so this is the agent itself),
    /// None once stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait until the log contains `needle`; fail (with the log) if the agent
    /// exits or the time runs out.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Wait until the log contains `needle` at least `n` times.
    pub fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= n {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not log {needle:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `proxyctl --bpffs-path <this agent's> args...` and return stdout.
    pub fn proxyctl(&self, args: &[&str]) -> Result<String> {
        proxyctl(&self.bpffs_path, args)
    }

    /// Stop with SIGTERM (clean shutdown), waiting for exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent {} log ----\n{}", self.node_name, self.log());
        }
        let _ = self.stop();
        let _ = fs::remove_dir_all(&self.bpffs_path);
    }
}

/// Run proxyctl against a pin directory.
pub fn proxyctl(bpffs_path: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(binary("proxyctl")?)
        .arg("--bpffs-path")
        .arg(bpffs_path)
        .args(args)
        .output()
        .context("running proxyctl")?;
    if !out.status.success() {
        bail!(
            "proxyctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agents' `RUST_LOG`: `PROXY_TEST_AGENT_LOG` when set (the benchmark
/// runs them at `info`, as deployed: a debug line per watched object would
/// be part of what it measures), else `info,proxy=debug` for the tests'
/// evidence and failure output.
fn log_filter() -> String {
    std::env::var("PROXY_TEST_AGENT_LOG").unwrap_or_else(|_| "info,proxy=debug".to_owned())
}
