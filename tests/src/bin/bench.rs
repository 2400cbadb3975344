//! `cargo xtask bench`: every mode side by side in one run (see
//! `proxy_tests::bench` for the report and `docs/benchmarks.md` for the
//! method). The agent binaries come from `PROXY_BIN_DIR` (xtask points it
//! at `target/release`); `connrate` is expected next to this binary.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proxy_tests::{
    agent::{Agent, AgentOptions, binary},
    apiserver::ApiServer,
    bench::{self, Failure, Machine, ModeStatus, Params, Run, Sample, metric},
    cgroup::Cgroup,
    cluster::{Cluster, ClusterSpec},
    scenario::{Endpoint, EndpointSlice, KubeObject, Service},
};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Benchmark every dataplane mode side by side")]
struct Args {
    /// Modes to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,ebpf-socket,ebpf-tc,ebpf-xdp,iptables,nftables,ipvs"
    )]
    modes: Vec<String>,
    /// Numbers of services programmed, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    scales: Vec<usize>,
    /// Repeats of every data-path measurement.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Seconds per measurement (iperf3 takes whole seconds, at least 1).
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Changes timed (new service -> data path) per mode and scale.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Endpoints of every service besides the measured one.
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Seconds the change timing may take per mode and scale; fewer
    /// changes are timed when it runs out (the report gives the count).
    #[arg(long, default_value_t = 45.0)]
    change_budget: f64,
    /// Seconds an agent's first sync may take before the scale is
    /// reported as not synced (and not measured). 30 s keeps the default
    /// run near 10 minutes: iptables and nftables at 10k services take
    /// longer than 60 s here anyway.
    #[arg(long, default_value_t = 30.0)]
    sync_timeout: f64,
    /// Seconds of each statistics pass: the kernel's per-program figures
    /// are taken in a separate, short run of the same measurement after
    /// each rate / throughput measurement (counting costs two clock reads
    /// per program run, so it is off while rates are measured).
    #[arg(long, default_value_t = 1.0)]
    stats_duration: f64,
    /// iptables, nftables and ipvs skip the scales above this one
    /// (reported as not run at that scale, not as a failure), so one run
    /// can take the eBPF modes further.
    #[arg(long)]
    fallback_max_scale: Option<usize>,
    /// Client threads of the connection-rate test.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Leave out the iperf3 measurements (connection rate and latency
    /// only).
    #[arg(long)]
    skip_throughput: bool,
    /// CI smoke run: 1 s measurements, scales 1 and 100, one round, 10
    /// changes; 4-stream iperf3 and the pinned latency left out.
    #[arg(long)]
    quick: bool,
    /// Where the report, JSON and plots go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))]
    out: PathBuf,
    /// Only regenerate the report and plots from this benchmarks.json.
    #[arg(long)]
    report_from: Option<PathBuf>,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The measured service's IPv6 ClusterIP (it is dual-stack).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const CONN_PORT: u16 = 7000;
/// The echo server pinned to [`LAT_CPU`], for latency without cross-CPU
/// wakeups.
const LAT_PORT: u16 = 7001;
const LAT_CPU: usize = 0;
const IPERF_PORT: u16 = 5201;
const NODE_PORT: u16 = 30201;

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(json) = &args.report_from {
        let run: Run = serde_json::from_slice(
            &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
        )
        .with_context(|| format!("parsing {}", json.display()))?;
        bench::write_report(&run, &args.out)?;
        println!("report regenerated in {}", args.out.display());
        return Ok(());
    }
    if args.quick {
        args.duration = 1.0;
        args.scales = vec![1, 100];
        args.repeat = 1;
        args.changes = 10;
    }
    args.scales.sort_unstable();
    args.scales.dedup();
    if args.scales.is_empty() || args.scales[0] == 0 {
        bail!("--scales needs at least one number of services >= 1");
    }
    for m in &args.modes {
        if !bench::MODES.contains(&m.as_str()) {
            bail!("unknown mode {m:?}; known: {:?}", bench::MODES);
        }
    }
    let command = {
        let rest: Vec<String> = std::env::args().skip(1).collect();
        if rest.is_empty() {
            "cargo xtask bench".to_owned()
        } else {
            format!("cargo xtask bench {}", rest.join(" "))
        }
    };
    let mut b = Bench::new(&args, command)?;
    if args.modes.iter().any(|m| m == "direct") {
        b.status("direct", true, None);
    }
    for (si, &scale) in args.scales.iter().enumerate() {
        b.scale(si, scale);
    }
    for l in 0..b.lanes.len() {
        let (mode, unavailable) = (b.lanes[l].mode.clone(), b.lanes[l].unavailable);
        if mode != "direct" && !unavailable {
            b.status(&mode, true, None);
        }
    }
    b.run.wall_s = b.start.elapsed().as_secs_f64();
    bench::write_report(&b.run, &args.out)?;
    println!(
        "==> done in {:.0} s; report: {}",
        b.run.wall_s,
        args.out.join("benchmarks.md").display()
    );
    // Smoke check for CI: every available mode produced numbers.
    let mut empty = Vec::new();
    for st in b.run.modes.iter().filter(|s| s.available) {
        if !b.run.samples.iter().any(|s| s.mode == st.mode) {
            empty.push(st.mode.clone());
        }
    }
    if !empty.is_empty() {
        bail!("modes ran but produced no numbers: {empty:?}");
    }
    Ok(())
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `prog args` in network namespace `ns` (nsenter execs: one pid).
fn in_ns(ns: &Path, prog: &Path, args: &[String]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(prog)
        .args(args);
    c
}

/// `prog args` in `ns`, already a member of `cgroup` when it execs (so
/// the socket-LB hooks see it from its first connect).
fn in_pod(cgroup: &Path, ns: &Path, prog: &Path, args: &[String]) -> Command {
    let script = r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" -- "$@""#;
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(script)
        .arg("bench-sh")
        .arg(cgroup)
        .arg(ns)
        .arg(prog)
        .args(args);
    c
}

/// Run to completion with a deadline; stdout on success, an error with
/// stderr otherwise.
fn output_within(mut cmd: Command, within: Duration) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + within;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "exited {}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.chars().take(400).collect::<String>()
        );
    }
    Ok(stdout)
}

fn add(ip: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) + n)
}

/// Strip ANSI escapes (the agent's log has none when not on a terminal,
/// but be safe).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `elapsed_ms` of the first `sync done` line.
fn first_sync_ms(log: &str) -> Option<f64> {
    let log = strip_ansi(log);
    let line = log.lines().find(|l| l.contains("sync done"))?;
    let rest = &line[line.find("elapsed_ms=")? + "elapsed_ms=".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Why an agent exited: its `Error:` line and causes (anyhow's report,
/// without a backtrace), else its last ERROR log line, else its last line.
fn exit_reason(log: &str) -> String {
    let log = strip_ansi(log);
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    if let Some(i) = lines.iter().position(|l| l.starts_with("Error:")) {
        let mut out = vec![lines[i].trim_start_matches("Error:").trim().to_owned()];
        for l in &lines[i + 1..] {
            if l.starts_with("Stack backtrace") {
                break;
            }
            if l.is_empty() || *l == "Caused by:" {
                continue;
            }
            out.push(
                l.trim_start_matches(|c: char| c.is_ascii_digit() || c == ':')
                    .trim()
                    .to_owned(),
            );
        }
        return out.join(": ");
    }
    lines
        .iter()
        .rev()
        .find(|l| l.contains("ERROR"))
        .or_else(|| lines.iter().rev().find(|l| !l.is_empty()))
        .map(|l| (*l).to_owned())
        .unwrap_or_else(|| "(empty log)".into())
}

/// How an agent's first sync ended.
enum SyncWait {
    Done,
    /// The agent logged `sync failed` (it keeps retrying; we stop waiting).
    Failed(String),
    /// The agent exited.
    Exited(String),
}

/// Wait for node's agent's first `sync done`, reading its log
/// incrementally; a `sync failed` or an exit ends the wait at once.
fn wait_sync(a: &Agent, timeout: Duration) -> Result<SyncWait> {
    use std::io::{Read, Seek, SeekFrom};
    let deadline = Instant::now() + timeout;
    let mut offset = 0u64;
    let mut pending = String::new();
    loop {
        if let Ok(mut f) = std::fs::File::open(&a.log_path) {
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            pending.push_str(&String::from_utf8_lossy(&buf));
            let (complete, rest) = match pending.rfind('\n') {
                Some(i) => (pending[..=i].to_owned(), pending[i + 1..].to_owned()),
                None => (String::new(), pending.clone()),
            };
            pending = rest;
            for line in complete.lines() {
                let line = strip_ansi(line);
                if line.contains("sync done") {
                    return Ok(SyncWait::Done);
                }
                if line.contains("sync failed") {
                    let why = line
                        .find("error=")
                        .map(|i| line[i + "error=".len()..].to_owned())
                        .unwrap_or(line.clone());
                    return Ok(SyncWait::Failed(why));
                }
            }
        }
        let alive = a.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|st| {
                    st.rsplit(')')
                        .next()
                        .and_then(|r| r.split_whitespace().next())
                        != Some("Z")
                })
                .unwrap_or(false)
        });
        if !alive {
            return Ok(SyncWait::Exited(exit_reason(&a.log())));
        }
        if Instant::now() > deadline {
            bail!("the first sync did not finish within {timeout:?} (--sync-timeout)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The agent process behind an `Agent` (nsenter execs; if it ever forks,
/// take its child).
fn agent_pid(a: &Agent) -> Option<u32> {
    let pid = a.pid()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "nsenter" {
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        return kids.split_whitespace().next()?.parse().ok();
    }
    Some(pid)
}

/// SIGKILL the agent's child processes (an iptables-restore still
/// running when we give up on a sync), so stopping the agent is prompt.
fn kill_children(a: &Agent) {
    let Some(pid) = agent_pid(a) else { return };
    let mut kids = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            kids += &std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            kids.push(' ');
        }
    }
    for k in kids
        .split_whitespace()
        .filter_map(|k| k.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a child of our own child.
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
}

/// VmHWM in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Sum of `memlock` over the distinct BPF maps the process holds.
fn bpf_map_mib(pid: u32) -> Result<Option<f64>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += mem;
        }
    }
    Ok(if seen.is_empty() {
        None
    } else {
        Some(total as f64 / (1024.0 * 1024.0))
    })
}

/// A `connrate probe` in the client pod and cgroup: connects to each
/// address written to it until it answers.
struct Prober {
    _proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Prober {
    fn start(cmd: Command) -> Result<Prober> {
        let mut cmd = cmd;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting connrate probe")?;
        let stdin = child.stdin.take().context("probe stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("probe stdout")?);
        Ok(Prober {
            _proc: Proc(child),
            stdin,
            stdout,
        })
    }

    /// Ask for `to`; Ok when a connect succeeded.
    fn wait_up(&mut self, to: SocketAddr) -> Result<()> {
        writeln!(self.stdin, "{to}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.starts_with("ok ") {
            Ok(())
        } else {
            bail!("{to}: probe said {:?}", line.trim())
        }
    }
}

/// Whole-machine CPU time spent busy (user + nice + system + irq +
/// softirq, both CPUs), in seconds, from the `cpu` line of /proc/stat.
fn cpu_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    Some(busy as f64 / hz as f64)
}

/// Run time and run count of BPF programs, summed by program name.
type BpfSnapshot = std::collections::BTreeMap<String, (u64, u64)>;

/// The kernel's per-program run-time statistics, on while this is held
/// (`BPF_ENABLE_STATS`: reference-counted in the kernel, so it neither
/// needs nor disturbs `kernel.bpf_stats_enabled`, which other users of a
/// shared machine may set). Counting costs two clock reads per program
/// run, so it is on only for the short statistics passes, never while a
/// rate or throughput is measured.
struct StatsOn {
    /// Statistics stay on until this closes.
    _fd: Option<std::os::fd::OwnedFd>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsOn {
    fn enable() -> StatsOn {
        use std::os::fd::FromRawFd;
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr's enable_stats: { __u32 type } (BPF_STATS_RUN_TIME = 0).
        let attr: u32 = 0;
        // SAFETY: bpf(2) reads 4 bytes of `attr`; it returns a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                &attr as *const u32,
                std::mem::size_of::<u32>() as libc::c_uint,
            )
        };
        if fd < 0 {
            println!(
                "    warning: BPF_ENABLE_STATS: {} (no per-program figures)",
                std::io::Error::last_os_error()
            );
            return StatsOn { _fd: None };
        }
        // SAFETY: a descriptor the kernel just gave us, owned from here.
        StatsOn {
            _fd: Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }),
        }
    }

    /// Whether `kernel.bpf_stats_enabled` is set (by someone else): then
    /// the programs pay for the statistics during every measurement too.
    fn sysctl_on() -> bool {
        std::fs::read_to_string(BPF_STATS).is_ok_and(|s| s.trim() == "1")
    }

    /// The programs held by any of `pids` (their `anon_inode:bpf-prog`
    /// descriptors; run time and count from fdinfo), summed by name
    /// (names from `bpftool prog show`).
    fn snapshot(pids: &[u32]) -> Result<BpfSnapshot> {
        let mut held: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        for pid in pids {
            for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
                let Ok(link) = std::fs::read_link(e.path()) else {
                    continue;
                };
                if link.to_string_lossy() != "anon_inode:bpf-prog" {
                    continue;
                }
                let info = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    e.file_name().to_string_lossy()
                ))
                .unwrap_or_default();
                let field = |k: &str| {
                    info.lines()
                        .find(|l| l.starts_with(k))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                if let Some(id) = field("prog_id:") {
                    held.insert(
                        id,
                        (
                            field("run_time_ns:").unwrap_or(0),
                            field("run_cnt:").unwrap_or(0),
                        ),
                    );
                }
            }
        }
        if held.is_empty() {
            return Ok(BpfSnapshot::new());
        }
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()
            .context("running bpftool prog show")?;
        if !out.status.success() {
            bail!(
                "bpftool prog show: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
        let mut snap = BpfSnapshot::new();
        for p in v.as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(id), Some(name)) = (p["id"].as_u64(), p["name"].as_str()) else {
                continue;
            };
            if let Some((ns, cnt)) = held.get(&id) {
                let e = snap.entry(name.to_owned()).or_insert((0, 0));
                e.0 += ns;
                e.1 += cnt;
            }
        }
        Ok(snap)
    }
}

/// Machine CPU across one measurement.
struct Cost {
    cpu0: Option<f64>,
}

impl Cost {
    fn start() -> Cost {
        Cost { cpu0: cpu_busy_s() }
    }

    /// CPU seconds since `start`.
    fn finish(self) -> Option<f64> {
        match (self.cpu0, cpu_busy_s()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        }
    }
}

/// The per-program figures of one statistics pass: statistics on, a
/// snapshot of the lane's programs before and after.
struct StatsPass {
    _on: StatsOn,
    before: Option<BpfSnapshot>,
    pids: Vec<u32>,
}

impl StatsPass {
    fn start(pids: Vec<u32>) -> StatsPass {
        let on = StatsOn::enable();
        let before = StatsOn::snapshot(&pids).ok();
        StatsPass {
            _on: on,
            before,
            pids,
        }
    }

    /// Per program: ns per run and runs, since `start`.
    fn finish(self) -> Vec<(String, f64, u64)> {
        let mut progs = Vec::new();
        if let Some(before) = &self.before
            && let Ok(after) = StatsOn::snapshot(&self.pids)
        {
            for (name, (ns, cnt)) in after {
                let (ns0, cnt0) = before.get(&name).copied().unwrap_or((0, 0));
                let runs = cnt.saturating_sub(cnt0);
                if runs > 0 {
                    progs.push((name, ns.saturating_sub(ns0) as f64 / runs as f64, runs));
                }
            }
        }
        progs
    }
}

/// One mode's own cluster (its namespaces, cgroups and echo server), so
/// every mode's agents stay up while the rounds alternate between modes.
struct Lane {
    mode: String,
    cluster: Cluster,
    cgroups: Vec<Cgroup>,
    /// The echo servers: unpinned on CONN_PORT, pinned on LAT_PORT.
    _server: (Proc, Proc),
    /// This scale's fixture, agents and prober (none for `direct`).
    api: Option<ApiServer>,
    agents: Vec<Agent>,
    prober: Option<Prober>,
    /// Measured at this scale.
    ready: bool,
    /// The agent could not start at all.
    unavailable: bool,
}

impl Lane {
    fn new(mode: &str, connrate: &Path) -> Result<Lane> {
        let cluster = Cluster::new(ClusterSpec::default())
            .with_context(|| format!("building the cluster for {mode}"))?;
        // The external client reaches pods through node1 (for `direct`).
        cluster
            .external()
            .add_route("10.244.0.0/16", cluster.node(1).underlay_ip)?;
        let cgroups = cluster
            .nodes()
            .iter()
            .map(|n| Cgroup::new(&format!("bench-{mode}-{}", n.name)))
            .collect::<Result<Vec<_>>>()?;
        let server_pod = cluster.pod(2, 1);
        let serve = |port: u16, cpu: Option<usize>| -> Result<Proc> {
            // Both families on one socket (IPv4-mapped on [::]).
            let mut a = vec!["serve".to_owned(), "--bind".into(), format!("[::]:{port}")];
            if let Some(c) = cpu {
                a.extend([
                    "--threads".into(),
                    "2".into(),
                    "--cpu".into(),
                    c.to_string(),
                ]);
            }
            let mut child = in_ns(&server_pod.ns.path(), connrate, &a)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting connrate serve")?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
            let server = Proc(child);
            if !line.starts_with("listening") {
                bail!("connrate serve did not start: {line:?}");
            }
            Ok(server)
        };
        let server = (serve(CONN_PORT, None)?, serve(LAT_PORT, Some(LAT_CPU))?);
        Ok(Lane {
            mode: mode.to_owned(),
            cluster,
            cgroups,
            _server: server,
            api: None,
            agents: Vec::new(),
            prober: None,
            ready: mode == "direct",
            unavailable: false,
        })
    }

    fn client_cmd(&self, prog: &Path, args: &[String]) -> Command {
        let pod = self.cluster.pod(1, 1);
        in_pod(self.cgroups[0].path(), &pod.ns.path(), prog, args)
    }

    /// The agents' processes (for their BPF programs).
    fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().filter_map(agent_pid).collect()
    }

    /// Where the client connects: the pod IP for `direct`, else the VIP.
    fn conn_to(&self, port: u16) -> SocketAddr {
        if self.mode == "direct" {
            SocketAddr::from((self.cluster.pod(2, 1).ip, port))
        } else {
            SocketAddr::from((VIP, port))
        }
    }

    /// [`Self::conn_to`] over IPv6: the pod's IPv6 address, else the
    /// service's IPv6 ClusterIP.
    fn conn_to6(&self, port: u16) -> SocketAddr {
        if self.mode == "direct" {
            SocketAddr::from((self.cluster.pod(2, 1).ip6, port))
        } else {
            SocketAddr::from((VIP6, port))
        }
    }

    /// Whether this mode serves an IPv6 ClusterIP (see
    /// [`bench::IPV6_MODES`]).
    fn serves_ipv6(&self) -> bool {
        bench::IPV6_MODES.contains(&self.mode.as_str())
    }

    fn iperf_to(&self) -> (SocketAddr, SocketAddr) {
        if self.mode == "direct" {
            let ip = self.cluster.pod(2, 1).ip;
            let a = SocketAddr::from((ip, IPERF_PORT));
            (a, a)
        } else {
            (
                SocketAddr::from((VIP, IPERF_PORT)),
                SocketAddr::from((self.cluster.node(1).underlay_ip, NODE_PORT)),
            )
        }
    }

    /// `proxy --cleanup` on every node: whatever a mode left goes.
    fn cleanup(&self) {
        let Ok(proxy) = binary("proxy") else { return };
        for n in self.cluster.nodes() {
            let cmd = in_ns(
                &n.ns.path(),
                &proxy,
                &[
                    "--cleanup".into(),
                    "--hostname-override".into(),
                    n.name.clone(),
                    "--bpffs-path".into(),
                    format!("/sys/fs/bpf/proxy-bench-cleanup-{}", std::process::id()),
                ],
            );
            if let Err(e) = output_within(cmd, Duration::from_secs(30)) {
                println!("    warning: proxy --cleanup on {}: {e:#}", n.name);
            }
        }
    }

    /// Stop this scale's agents and forget its fixture.
    fn stop_agents(&mut self) {
        for a in &mut self.agents {
            kill_children(a);
            let _ = a.stop();
        }
        self.agents.clear();
        self.prober = None;
        self.api = None;
        if self.mode != "direct" {
            self.ready = false;
        }
    }
}

struct Bench<'a> {
    args: &'a Args,
    start: Instant,
    run: Run,
    connrate: PathBuf,
    lanes: Vec<Lane>,
}

impl<'a> Bench<'a> {
    fn new(args: &'a Args, command: String) -> Result<Bench<'a>> {
        let start = Instant::now();
        let connrate = std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("connrate");
        if !connrate.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release -p proxy-tests --bins`",
                connrate.display()
            );
        }
        binary("proxy")?;
        let machine = Machine {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .unwrap_or("unknown")
                .trim()
                .to_owned(),
            load: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        };
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        println!(
            "==> bench: modes {:?}, scales {:?}, {} round(s) x {} s, {} changes; kernel {}, {} CPUs ({}), load {}",
            args.modes,
            args.scales,
            args.repeat,
            args.duration,
            args.changes,
            machine.kernel,
            machine.cpus,
            machine.cpu_model,
            machine.load
        );
        if StatsOn::sysctl_on() {
            println!(
                "    warning: {BPF_STATS} is 1 (set by someone else): the programs pay for their statistics during every measurement, not only in the statistics passes"
            );
        }
        let mut lanes = Vec::new();
        for mode in &args.modes {
            let lane = Lane::new(mode, &connrate)?;
            lane.cleanup();
            lanes.push(lane);
        }
        Ok(Bench {
            args,
            start,
            run: Run {
                date,
                wall_s: 0.0,
                machine,
                params: Params {
                    command,
                    duration_s: args.duration,
                    repeat: args.repeat,
                    scales: args.scales.clone(),
                    changes: args.changes,
                    change_budget_s: args.change_budget,
                    threads: args.threads,
                    endpoints: args.endpoints,
                    interleaved: true,
                    stats_pass_s: args.stats_duration.max(0.2),
                    fallback_max_scale: args.fallback_max_scale,
                    stats_sysctl_on: StatsOn::sysctl_on(),
                },
                modes: Vec::new(),
                samples: Vec::new(),
                failures: Vec::new(),
                not_run: Vec::new(),
            },
            connrate,
            lanes,
        })
    }

    fn progress(&self, mode: &str, scale: Option<usize>, what: &str, text: &str) {
        println!(
            "[{:>5.0}s] {mode:<11} {:>6} svc  {what:<18} {text}",
            self.start.elapsed().as_secs_f64(),
            scale.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
        );
    }

    /// Records `<prefix>_p50` and `<prefix>_p99` from a `connrate` report's
    /// `p50_us` and `p99_us`.
    fn record_percentiles(
        &mut self,
        mode: &str,
        prefix: &str,
        scale: Option<usize>,
        repeat: usize,
        v: &Value,
    ) {
        for (q, field) in [("p50", "p50_us"), ("p99", "p99_us")] {
            let value = v[field].as_f64().unwrap_or(0.0);
            self.record(mode, &format!("{prefix}_{q}"), scale, repeat, value);
        }
    }

    fn record(&mut self, mode: &str, key: &str, scale: Option<usize>, repeat: usize, value: f64) {
        let unit = metric(key)
            .map(|m| m.unit)
            .unwrap_or(if key.starts_with(bench::BPF_NS) {
                "ns/run"
            } else {
                ""
            });
        let r = if self.args.repeat > 1 && (metric(key).is_none_or(|m| m.data_path)) {
            format!(" (r{}/{})", repeat + 1, self.args.repeat)
        } else {
            String::new()
        };
        self.progress(mode, scale, key, &format!("{value:.3} {unit}{r}"));
        self.run.samples.push(Sample {
            mode: mode.to_owned(),
            metric: key.to_owned(),
            scale,
            repeat,
            value,
        });
    }

    /// Record the per-program figures of one measurement.
    fn record_bpf(
        &mut self,
        mode: &str,
        what: &str,
        scale: Option<usize>,
        repeat: usize,
        progs: &[(String, f64, u64)],
        units: Option<f64>,
    ) {
        for (name, ns, runs) in progs {
            self.record(
                mode,
                &format!("{}{what}.{name}", bench::BPF_NS),
                scale,
                repeat,
                *ns,
            );
            if let Some(u) = units.filter(|u| *u > 0.0) {
                self.record(
                    mode,
                    &format!("{}{what}.{name}", bench::BPF_RUNS),
                    scale,
                    repeat,
                    *runs as f64 / u,
                );
            }
        }
    }

    fn fail(&mut self, mode: &str, what: &str, scale: Option<usize>, error: &str) {
        self.progress(mode, scale, what, &format!("FAILED: {error}"));
        self.run.failures.push(Failure {
            mode: mode.to_owned(),
            what: what.to_owned(),
            scale,
            error: error.to_owned(),
        });
    }

    fn status(&mut self, mode: &str, available: bool, reason: Option<String>) {
        self.run.modes.push(ModeStatus {
            mode: mode.to_owned(),
            available,
            reason,
        });
    }

    fn secs(&self) -> String {
        format!("{}", self.args.duration)
    }

    /// iperf3 against a one-off server in the lane's pod-2-1; returns
    /// Gbit/s (TCP) or received kpps (UDP 64 B), and the bytes received.
    fn iperf(
        &self,
        lane: usize,
        from_external: bool,
        to: SocketAddr,
        streams: usize,
        udp: bool,
        secs: u64,
    ) -> Result<(f64, f64)> {
        let l = &self.lanes[lane];
        let server_ns = l.cluster.pod(2, 1).ns.path();
        let iperf3 = PathBuf::from("iperf3");
        let mut server = in_ns(
            &server_ns,
            &iperf3,
            &[
                "-s".into(),
                "-1".into(),
                "-p".into(),
                IPERF_PORT.to_string(),
            ],
        );
        let server = Proc(
            server
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting iperf3 -s")?,
        );
        std::thread::sleep(Duration::from_millis(200));
        let mut a: Vec<String> = vec![
            "-c".into(),
            to.ip().to_string(),
            "-p".into(),
            to.port().to_string(),
            "-t".into(),
            secs.to_string(),
            "-P".into(),
            streams.to_string(),
            "-J".into(),
            "--connect-timeout".into(),
            "3000".into(),
        ];
        if udp {
            a.extend(["-u", "-b", "0", "-l", "64"].map(String::from));
        }
        let cmd = if from_external {
            in_ns(&l.cluster.external().ns.path(), &iperf3, &a)
        } else {
            l.client_cmd(&iperf3, &a)
        };
        let out = output_within(cmd, Duration::from_secs(secs + 20));
        drop(server);
        let out = out?;
        let v: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            bail!("iperf3: {e}");
        }
        let recv = &v["end"]["sum_received"];
        let bytes = recv["bytes"].as_f64().context("sum_received.bytes")?;
        if udp {
            let s = recv["seconds"].as_f64().context("sum_received.seconds")?;
            Ok((bytes / 64.0 / s / 1000.0, bytes))
        } else {
            Ok((
                recv["bits_per_second"]
                    .as_f64()
                    .context("sum_received.bits_per_second")?
                    / 1e9,
                bytes,
            ))
        }
    }

    /// The five iperf3 figures of one round, with their CPU cost; then,
    /// for the 1-stream TCP paths, a statistics pass (see [`StatsOn`]) for
    /// the programs' own cost.
    fn throughput(&mut self, lane: usize, r: usize) {
        let mode = self.lanes[lane].mode.clone();
        let (cip, np) = self.lanes[lane].iperf_to();
        let cip6 = self.lanes[lane].conn_to6(IPERF_PORT);
        let v6 = self.lanes[lane].serves_ipv6();
        let secs = (self.args.duration.round() as u64).max(1);
        for (key, ext, to, streams, udp) in [
            ("tcp_clusterip_1", false, cip, 1, false),
            ("tcp_clusterip_v6_1", false, cip6, 1, false),
            ("tcp_clusterip_4", false, cip, 4, false),
            ("tcp_nodeport_1", true, np, 1, false),
            ("tcp_nodeport_4", true, np, 4, false),
            ("udp64_nodeport", true, np, 1, true),
        ] {
            // The smoke run keeps one test per path (ClusterIP, NodePort,
            // UDP).
            if self.args.quick && streams == 4 {
                continue;
            }
            if to.is_ipv6() && !v6 {
                continue;
            }
            let cost = Cost::start();
            let res = self.iperf(lane, ext, to, streams, udp, secs);
            let cpu = cost.finish();
            match res {
                Ok((v, bytes)) => {
                    self.record(&mode, key, None, r, v);
                    if let Some(cpu) = cpu
                        && bytes > 0.0
                    {
                        self.record(&mode, &format!("{key}_cpu"), None, r, cpu / (bytes / 1e9));
                    }
                }
                Err(e) => self.fail(&mode, key, None, &format!("{e:#}")),
            }
            let pids = self.lanes[lane].agent_pids();
            if streams != 1 || udp || pids.is_empty() {
                continue;
            }
            let pass = StatsPass::start(pids);
            let res = self.iperf(lane, ext, to, streams, udp, self.stats_secs().ceil() as u64);
            let progs = pass.finish();
            match res {
                Ok((_, bytes)) => {
                    self.record_bpf(&mode, key, None, r, &progs, Some(bytes / 1500.0))
                }
                Err(e) => self.fail(
                    &mode,
                    &format!("{key} statistics pass"),
                    None,
                    &format!("{e:#}"),
                ),
            }
        }
    }

    /// `connrate rate` for `secs` seconds from the client pod: its JSON
    /// report.
    fn rate(&self, lane: usize, to: SocketAddr, secs: f64) -> Result<Value> {
        let cmd = self.lanes[lane].client_cmd(
            &self.connrate,
            &[
                "rate".into(),
                "--to".into(),
                to.to_string(),
                "--threads".into(),
                self.args.threads.to_string(),
                "--duration".into(),
                format!("{secs}"),
            ],
        );
        output_within(cmd, Duration::from_secs_f64(secs + 20.0))
            .and_then(|o| Ok(serde_json::from_str::<Value>(&o)?))
    }

    /// Seconds of a statistics pass.
    fn stats_secs(&self) -> f64 {
        self.args.stats_duration.max(0.2)
    }

    /// Records a `connrate rate` result under `key`, or the failure: none
    /// succeeded, or more than 1 % errors beside the successes (recorded,
    /// the rate counting successes only). Returns the successes and the
    /// report when a rate was recorded.
    fn record_rate(
        &mut self,
        mode: &str,
        key: &str,
        scale: Option<usize>,
        r: usize,
        res: Result<Value>,
    ) -> Option<(u64, Value)> {
        let v = match res {
            Ok(v) => v,
            Err(e) => {
                self.fail(mode, key, scale, &format!("{e:#}"));
                return None;
            }
        };
        let ok = v["connections"].as_u64().unwrap_or(0);
        let errors = v["errors"].as_u64().unwrap_or(0);
        if ok == 0 {
            self.fail(
                mode,
                key,
                scale,
                &format!(
                    "no connection succeeded ({errors} errors, last: {})",
                    v["last_error"]
                ),
            );
            return None;
        }
        if errors * 100 > ok {
            self.fail(
                mode,
                &format!("{key} errors"),
                scale,
                &format!(
                    "{errors} errors beside {ok} connections (last: {}); the rate counts successes only",
                    v["last_error"]
                ),
            );
        }
        self.record(mode, key, scale, r, v["rate"].as_f64().unwrap_or(0.0));
        Some((ok, v))
    }

    /// Connection rate (with its CPU cost; then a statistics pass for the
    /// programs' own cost) and request/response latency of one round.
    fn conn(&mut self, lane: usize, scale: Option<usize>, r: usize) {
        let mode = self.lanes[lane].mode.clone();
        let cost = Cost::start();
        let res = self.rate(
            lane,
            self.lanes[lane].conn_to(CONN_PORT),
            self.args.duration,
        );
        let cpu = cost.finish();
        if let Some((ok, v)) = self.record_rate(&mode, "conn_rate", scale, r, res) {
            if let Some(cpu) = cpu {
                self.record(&mode, "conn_cpu", scale, r, cpu * 1e6 / ok as f64);
            }
            self.record_percentiles(&mode, "conn", scale, r, &v);
        }
        let pids = self.lanes[lane].agent_pids();
        if !pids.is_empty() {
            let pass = StatsPass::start(pids);
            let res = self.rate(lane, self.lanes[lane].conn_to(CONN_PORT), self.stats_secs());
            let progs = pass.finish();
            match res {
                Ok(v) => {
                    let ok = v["connections"].as_u64().unwrap_or(0) as f64;
                    // The rate with statistics on, beside the one without:
                    // what counting costs (JSON only).
                    self.record(
                        &mode,
                        "conn_rate_stats_on",
                        scale,
                        r,
                        v["rate"].as_f64().unwrap_or(0.0),
                    );
                    self.record_bpf(&mode, "conn_rate", scale, r, &progs, Some(ok));
                }
                Err(e) => self.fail(&mode, "conn_rate statistics pass", scale, &format!("{e:#}")),
            }
        }
        // The connection rate over IPv6, as a ratio to IPv6 direct.
        if self.lanes[lane].serves_ipv6() {
            let to = self.lanes[lane].conn_to6(CONN_PORT);
            let res = self.rate(lane, to, self.args.duration);
            self.record_rate(&mode, "conn_rate_v6", scale, r, res);
        }
        // As the scheduler places both ends, then both on one CPU.
        for (prefix, port, pin) in [
            ("rr", CONN_PORT, None),
            ("rr_pinned", LAT_PORT, Some(LAT_CPU)),
        ] {
            if self.args.quick && pin.is_some() {
                continue;
            }
            let to = self.lanes[lane].conn_to(port);
            let mut a = vec![
                "latency".into(),
                "--to".into(),
                to.to_string(),
                "--duration".into(),
                self.secs(),
            ];
            if let Some(cpu) = pin {
                a.extend(["--cpu".into(), cpu.to_string()]);
            }
            let cmd = self.lanes[lane].client_cmd(&self.connrate, &a);
            let res = output_within(cmd, Duration::from_secs_f64(self.args.duration + 20.0))
                .and_then(|o| Ok(serde_json::from_str::<Value>(&o)?));
            match res {
                Ok(v) => self.record_percentiles(&mode, prefix, scale, r, &v),
                Err(e) => self.fail(
                    &mode,
                    &format!("{prefix}_latency"),
                    scale,
                    &format!("{e:#}"),
                ),
            }
        }
    }

    /// The fixture for one scale: Nodes, the measured service and
    /// `scale - 1` others with `--endpoints` endpoints each.
    fn fixture(&self, lane: usize, scale: usize) -> Result<ApiServer> {
        let cluster = &self.lanes[lane].cluster;
        let api = ApiServer::start()?;
        for node in cluster.nodes() {
            api.create(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": node.underlay_ip.to_string()},
                    {"type": "Hostname", "address": node.name},
                ]},
            }))?;
        }
        let backend = cluster.pod(2, 1);
        api.create(
            EndpointSlice::new("bench-1", "bench")
                .tcp_port("conn", CONN_PORT)
                .tcp_port("lat", LAT_PORT)
                .tcp_port("iperf-tcp", IPERF_PORT)
                .udp_port("iperf-udp", IPERF_PORT)
                .endpoint(Endpoint::ready(backend))
                .to_json(),
        )?;
        // Dual-stack: the IPv6 ClusterIP's endpoints come from their own
        // slice, as Kubernetes keeps one per family.
        api.create(
            EndpointSlice::new("bench-v6", "bench")
                .ipv6()
                .tcp_port("conn", CONN_PORT)
                .tcp_port("lat", LAT_PORT)
                .tcp_port("iperf-tcp", IPERF_PORT)
                .udp_port("iperf-udp", IPERF_PORT)
                .endpoint(Endpoint::ready(backend).ipv6(backend))
                .to_json(),
        )?;
        api.create(
            Service::dual_stack("bench", VIP.into(), VIP6.into())
                .tcp("conn", CONN_PORT, CONN_PORT)
                .tcp("lat", LAT_PORT, LAT_PORT)
                .tcp("iperf-tcp", IPERF_PORT, IPERF_PORT)
                .udp("iperf-udp", IPERF_PORT, IPERF_PORT)
                .node_port("iperf-tcp", NODE_PORT)
                .node_port("iperf-udp", NODE_PORT)
                .to_json(),
        )?;
        // Service i: 10.100.0.0 + i; endpoints from 10.128.0.0 up (room
        // for 100k services of up to 40 endpoints, clear of the pod
        // network 10.244/16 and of the VIP ranges).
        let ep_base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
        for i in 1..scale as u32 {
            let name = format!("svc-{i}");
            api.create(
                EndpointSlice::new(&format!("{name}-1"), &name)
                    .tcp_port("http", 8080)
                    .endpoints((0..self.args.endpoints).map(|k| {
                        let n = i * self.args.endpoints + k;
                        Endpoint::at(Ipv4Addr::from(ep_base + n), None)
                    }))
                    .to_json(),
            )?;
            api.create(
                Service::cluster_ip(&name, add(Ipv4Addr::new(10, 100, 0, 0), i))
                    .tcp("http", 80, 8080)
                    .to_json(),
            )?;
        }
        Ok(api)
    }

    fn agent_args(&self, lane: usize, node: usize) -> Vec<String> {
        let l = &self.lanes[lane];
        // ebpf-socket and ebpf-tc leave north-south to tc (no XDP: on
        // these veths any XDP program turns TSO off on the peer, which
        // costs every cross-node stream); ebpf-xdp is ebpf-socket with XDP.
        let (m, lb, xdp) = match l.mode.as_str() {
            "ebpf-socket" => ("ebpf", "true", "none"),
            "ebpf-tc" => ("ebpf", "false", "none"),
            "ebpf-xdp" => ("ebpf", "true", "auto"),
            other => (other, "false", "none"),
        };
        vec![
            "--mode".into(),
            m.into(),
            "--socket-lb".into(),
            lb.into(),
            "--xdp-mode".into(),
            xdp.into(),
            "--cgroup-path".into(),
            l.cgroups[node - 1].path().display().to_string(),
        ]
    }

    /// Fixture and agents of one lane at one scale; the lane is `ready`
    /// when the measured service answers. An agent that cannot start at
    /// the first scale makes the mode "not available" with the agent's own
    /// last words.
    fn setup(&mut self, lane: usize, si: usize, scale: usize) -> Result<()> {
        let mode = self.lanes[lane].mode.clone();
        let t = Instant::now();
        let api = self.fixture(lane, scale)?;
        self.progress(
            &mode,
            Some(scale),
            "fixture",
            &format!("{scale} services loaded in {} ms", t.elapsed().as_millis()),
        );
        let opts = |args| AgentOptions {
            args,
            ready_line: None,
            ready_timeout: Duration::from_secs(300),
            capabilities: None,
        };
        let sync_timeout = Duration::from_secs_f64(self.args.sync_timeout);
        let t = Instant::now();
        let a1 = Agent::start(
            self.lanes[lane].cluster.node(1),
            &api,
            opts(self.agent_args(lane, 1)),
        )?;
        let waited = wait_sync(&a1, sync_timeout);
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        let problem = match waited {
            Ok(SyncWait::Done) => None,
            Ok(SyncWait::Exited(why)) => Some((true, format!("the agent exited: {why}"))),
            Ok(SyncWait::Failed(why)) => Some((
                false,
                format!(
                    "the agent's first sync failed ({} services, {} endpoints each): {why}",
                    scale, self.args.endpoints
                ),
            )),
            Err(e) => Some((false, format!("{e:#}"))),
        };
        self.lanes[lane].agents.push(a1);
        if let Some((exited, reason)) = problem {
            self.lanes[lane].stop_agents();
            if si == 0 && exited {
                self.progress(
                    &mode,
                    Some(scale),
                    "agent",
                    &format!("NOT AVAILABLE: {reason}"),
                );
                self.status(&mode, false, Some(reason));
                self.lanes[lane].unavailable = true;
                return Ok(());
            }
            self.fail(&mode, "agent sync", Some(scale), &reason);
            return Ok(());
        }
        self.record(&mode, "full_sync_wall", Some(scale), 0, wall);
        match first_sync_ms(&self.lanes[lane].agents[0].log()) {
            Some(ms) => self.record(&mode, "full_sync_agent", Some(scale), 0, ms),
            None => self.fail(
                &mode,
                "full_sync_agent",
                Some(scale),
                "no elapsed_ms in `sync done`",
            ),
        }
        let a2 = Agent::start(
            self.lanes[lane].cluster.node(2),
            &api,
            opts(self.agent_args(lane, 2)),
        )?;
        match wait_sync(&a2, sync_timeout) {
            Ok(SyncWait::Done) => {}
            Ok(SyncWait::Failed(why) | SyncWait::Exited(why)) => {
                self.fail(&mode, "node2 agent", Some(scale), &why)
            }
            Err(e) => self.fail(&mode, "node2 agent", Some(scale), &format!("{e:#}")),
        }
        self.lanes[lane].agents.push(a2);
        let l = &self.lanes[lane];
        let mut prober = Prober::start(l.client_cmd(&self.connrate, &["probe".into()]))?;
        if let Err(e) = prober.wait_up(SocketAddr::from((VIP, CONN_PORT))) {
            self.fail(&mode, "service up", Some(scale), &format!("{e:#}"));
            self.lanes[lane].stop_agents();
            return Ok(());
        }
        let l = &mut self.lanes[lane];
        l.prober = Some(prober);
        l.api = Some(api);
        l.ready = true;
        Ok(())
    }

    /// One scale: every mode set up, then the rounds (each runs every
    /// ready mode's measurements once, in mode order), then the
    /// control-plane figures and the agents stopped.
    fn scale(&mut self, si: usize, scale: usize) {
        for lane in 0..self.lanes.len() {
            let l = &self.lanes[lane];
            if l.mode == "direct" || l.unavailable {
                continue;
            }
            if let Some(max) = self.args.fallback_max_scale
                && bench::FALLBACK_MODES.contains(&l.mode.as_str())
                && scale > max
            {
                let mode = l.mode.clone();
                let reason = format!("above --fallback-max-scale {max}");
                self.progress(&mode, Some(scale), "not run", &reason);
                self.run.not_run.push(bench::NotRun {
                    mode,
                    scale,
                    reason,
                    metric: None,
                });
                continue;
            }
            if !l.serves_ipv6() {
                let mode = l.mode.clone();
                let mut metrics = vec!["conn_rate_v6"];
                if si == 0 && !self.args.skip_throughput {
                    metrics.push("tcp_clusterip_v6_1");
                }
                for m in metrics {
                    self.run.not_run.push(bench::NotRun {
                        mode: mode.clone(),
                        scale,
                        reason: "IPv6 is not programmed in this mode yet".into(),
                        metric: Some(m.into()),
                    });
                }
            }
            if let Err(e) = self.setup(lane, si, scale) {
                let mode = self.lanes[lane].mode.clone();
                self.lanes[lane].stop_agents();
                self.fail(&mode, "setup", Some(scale), &format!("{e:#}"));
            }
        }
        for r in 0..self.args.repeat {
            println!("==> {scale} services, round {}/{}", r + 1, self.args.repeat);
            for lane in 0..self.lanes.len() {
                if !self.lanes[lane].ready {
                    continue;
                }
                if si == 0 && !self.args.skip_throughput {
                    self.throughput(lane, r);
                }
                self.conn(lane, Some(scale), r);
            }
        }
        for lane in 0..self.lanes.len() {
            if !self.lanes[lane].ready || self.lanes[lane].mode == "direct" {
                continue;
            }
            self.control_plane(lane, scale);
            self.lanes[lane].stop_agents();
            self.lanes[lane].cleanup();
        }
    }

    /// Changes to the data path, agent RSS and map memory.
    fn control_plane(&mut self, lane: usize, scale: usize) {
        let mode = self.lanes[lane].mode.clone();
        let (Some(api), Some(mut prober)) =
            (self.lanes[lane].api.take(), self.lanes[lane].prober.take())
        else {
            return;
        };
        self.changes(lane, scale, &api, &mut prober);
        if let Some(pid) = self.lanes[lane].agents.first().and_then(agent_pid) {
            match peak_rss_mib(pid) {
                Ok(v) => self.record(&mode, "rss", Some(scale), 0, v),
                Err(e) => self.fail(&mode, "rss", Some(scale), &format!("{e:#}")),
            }
            match bpf_map_mib(pid) {
                Ok(Some(v)) => self.record(&mode, "map_mem", Some(scale), 0, v),
                Ok(None) => {}
                Err(e) => self.fail(&mode, "map_mem", Some(scale), &format!("{e:#}")),
            }
        }
    }

    /// `changes` new services, one at a time: fixture accepts -> connect
    /// succeeds.
    fn changes(&mut self, lane: usize, scale: usize, api: &ApiServer, prober: &mut Prober) {
        let mode = self.lanes[lane].mode.clone();
        let backend = self.lanes[lane].cluster.pod(2, 1);
        let mut ms = Vec::new();
        let budget = Instant::now() + Duration::from_secs_f64(self.args.change_budget);
        for c in 0..self.args.changes as u32 {
            if Instant::now() > budget {
                break;
            }
            let name = format!("chg-{c}");
            let vip = add(Ipv4Addr::new(10, 110, 0, 0), c + 1);
            let slice = EndpointSlice::new(&format!("{name}-1"), &name)
                .tcp_port("conn", CONN_PORT)
                .endpoint(Endpoint::ready(backend))
                .to_json();
            let svc = Service::cluster_ip(&name, vip)
                .tcp("conn", CONN_PORT, CONN_PORT)
                .to_json();
            if let Err(e) = api.create(slice) {
                self.fail(&mode, "change", Some(scale), &format!("{e:#}"));
                return;
            }
            if let Err(e) = api.create(svc) {
                self.fail(&mode, "change", Some(scale), &format!("{e:#}"));
                return;
            }
            let t0 = Instant::now();
            match prober.wait_up(SocketAddr::from((vip, CONN_PORT))) {
                Ok(()) => ms.push(t0.elapsed().as_secs_f64() * 1000.0),
                Err(e) => {
                    self.fail(&mode, "change", Some(scale), &format!("{e:#}"));
                    return;
                }
            }
        }
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return;
        }
        let pct = |p: f64| ms[(((ms.len() - 1) as f64) * p).round() as usize];
        self.record(&mode, "change_n", Some(scale), 0, ms.len() as f64);
        self.record(&mode, "change_p50", Some(scale), 0, pct(0.5));
        self.record(&mode, "change_p99", Some(scale), 0, pct(0.99));
    }
}
