//! The benchmark suite's data, statistics and report (`cargo xtask bench`;
//! the runner is `src/bin/bench.rs`). Everything here is pure: the raw
//! samples go in, `docs/benchmarks.md` and the PNG plots come out, so the
//! report can be regenerated from `benchmarks.json` and is tested from a
//! fixed JSON.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The modes, in report order. `direct` is the client talking to the pod IP
/// with no service and no agent: the physical limit of this path.
pub const MODES: &[&str] = &[
    "direct",
    "ebpf-socket",
    "ebpf-tc",
    "ebpf-xdp",
    "iptables",
    "nftables",
    "ipvs",
];

/// One measured metric.
pub struct Metric {
    pub key: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Measured at every service scale (else once, with 1 service).
    pub per_scale: bool,
    /// Data-path figure (has a `direct` baseline) or control-plane figure.
    pub data_path: bool,
}

const fn m(
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    per_scale: bool,
    data_path: bool,
) -> Metric {
    Metric {
        key,
        title,
        unit,
        higher_is_better,
        per_scale,
        data_path,
    }
}

pub const METRICS: &[Metric] = &[
    m(
        "tcp_clusterip_1",
        "iperf3 TCP via ClusterIP (pod on node1 -> pod on node2), 1 stream",
        "Gbit/s",
        true,
        false,
        true,
    ),
    m(
        "tcp_clusterip_v6_1",
        "iperf3 TCP via IPv6 ClusterIP (pod on node1 -> pod on node2), 1 stream",
        "Gbit/s",
        true,
        false,
        true,
    ),
    m(
        "tcp_clusterip_4",
        "iperf3 TCP via ClusterIP (pod on node1 -> pod on node2), 4 streams",
        "Gbit/s",
        true,
        false,
        true,
    ),
    m(
        "tcp_nodeport_1",
        "iperf3 TCP via NodePort (external client -> node1 -> pod on node2), 1 stream",
        "Gbit/s",
        true,
        false,
        true,
    ),
    m(
        "tcp_nodeport_4",
        "iperf3 TCP via NodePort (external client -> node1 -> pod on node2), 4 streams",
        "Gbit/s",
        true,
        false,
        true,
    ),
    m(
        "udp64_nodeport",
        "iperf3 UDP 64-byte datagrams via NodePort, received by the server",
        "kpps",
        true,
        false,
        true,
    ),
    m(
        "conn_rate",
        "New TCP connections per second via ClusterIP (connect, 1 request, 1 reply, close)",
        "conn/s",
        true,
        true,
        true,
    ),
    m(
        "conn_rate_v6",
        "New TCP connections per second via IPv6 ClusterIP (connect, 1 request, 1 reply, close)",
        "conn/s",
        true,
        true,
        true,
    ),
    m(
        "conn_p50",
        "Connect + request + reply latency p50 (one connection per request)",
        "us",
        false,
        true,
        true,
    ),
    m(
        "conn_p99",
        "Connect + request + reply latency p99 (one connection per request)",
        "us",
        false,
        true,
        true,
    ),
    m(
        "rr_p50",
        "Request/response latency p50 (one persistent connection, back-to-back round trips)",
        "us",
        false,
        true,
        true,
    ),
    m(
        "rr_p99",
        "Request/response latency p99 (one persistent connection, back-to-back round trips)",
        "us",
        false,
        true,
        true,
    ),
    m(
        "rr_pinned_p50",
        "Request/response latency p50, client and server on one CPU (see the latency method)",
        "us",
        false,
        true,
        true,
    ),
    m(
        "rr_pinned_p99",
        "Request/response latency p99, client and server on one CPU",
        "us",
        false,
        true,
        true,
    ),
    m(
        "conn_cpu",
        "CPU per connection during the connection-rate test (whole machine: user + system + irq + softirq, both CPUs, / connections)",
        "us",
        false,
        true,
        true,
    ),
    m(
        "tcp_clusterip_1_cpu",
        "CPU per GB received, iperf3 TCP via ClusterIP, 1 stream (whole machine)",
        "CPU s/GB",
        false,
        false,
        true,
    ),
    m(
        "tcp_clusterip_4_cpu",
        "CPU per GB received, iperf3 TCP via ClusterIP, 4 streams (whole machine)",
        "CPU s/GB",
        false,
        false,
        true,
    ),
    m(
        "tcp_nodeport_1_cpu",
        "CPU per GB received, iperf3 TCP via NodePort, 1 stream (whole machine)",
        "CPU s/GB",
        false,
        false,
        true,
    ),
    m(
        "tcp_nodeport_4_cpu",
        "CPU per GB received, iperf3 TCP via NodePort, 4 streams (whole machine)",
        "CPU s/GB",
        false,
        false,
        true,
    ),
    m(
        "udp64_nodeport_cpu",
        "CPU per GB received, iperf3 UDP 64-byte datagrams via NodePort (whole machine)",
        "CPU s/GB",
        false,
        false,
        true,
    ),
    m(
        "change_p50",
        "Change to data path p50 (fixture accepted a new ClusterIP service -> a connect to it succeeds)",
        "ms",
        false,
        true,
        false,
    ),
    m(
        "change_p99",
        "Change to data path p99",
        "ms",
        false,
        true,
        false,
    ),
    m(
        "change_n",
        "Changes timed (fewer than asked when the change budget ran out)",
        "changes",
        true,
        true,
        false,
    ),
    m(
        "full_sync_wall",
        "Full sync, wall: agent start -> first `sync done` (list + watch + program)",
        "ms",
        false,
        true,
        false,
    ),
    m(
        "full_sync_agent",
        "Full sync, agent's own figure: `sync done` elapsed_ms (model + diff + program)",
        "ms",
        false,
        true,
        false,
    ),
    m(
        "rss",
        "Agent peak RSS (VmHWM), node1",
        "MiB",
        false,
        true,
        false,
    ),
    m(
        "map_mem",
        "eBPF map memory (memlock of the agent's maps), node1",
        "MiB",
        false,
        true,
        false,
    ),
];

/// Sample-name prefixes of the per-program BPF figures:
/// `bpf_ns.<measurement>.<program>` (run time per run, ns) and
/// `bpf_runs.<measurement>.<program>` (runs per connection, or per
/// 1500 bytes received for iperf3).
pub const BPF_NS: &str = "bpf_ns.";
pub const BPF_RUNS: &str = "bpf_runs.";

pub fn metric(key: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.key == key)
}

/// One raw measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub mode: String,
    pub metric: String,
    /// Services programmed (None: `direct`, which has no services).
    pub scale: Option<usize>,
    pub repeat: usize,
    pub value: f64,
}

/// Whether a mode ran, and why not.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModeStatus {
    pub mode: String,
    pub available: bool,
    pub reason: Option<String>,
}

/// A measurement that failed (reported, never replaced by a number).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub mode: String,
    pub what: String,
    pub scale: Option<usize>,
    pub error: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    /// /proc/loadavg (1, 5, 15 min) when the run started.
    #[serde(default)]
    pub load: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Params {
    pub command: String,
    pub duration_s: f64,
    pub repeat: usize,
    pub scales: Vec<usize>,
    pub changes: usize,
    /// Seconds the change timing may take per mode and scale.
    #[serde(default)]
    pub change_budget_s: f64,
    pub threads: usize,
    /// Endpoints per service (besides the measured one).
    #[serde(default = "ten")]
    pub endpoints: u32,
    /// Modes interleaved in rounds (`repeat` is then the number of
    /// rounds, and samples with the same `repeat` ran in the same round).
    #[serde(default)]
    pub interleaved: bool,
    /// Seconds of the statistics passes the per-program figures come from
    /// (0: an older run, with statistics on for the whole run).
    #[serde(default)]
    pub stats_pass_s: f64,
    /// Scales above this were not run for [`FALLBACK_MODES`].
    #[serde(default)]
    pub fallback_max_scale: Option<usize>,
    /// `kernel.bpf_stats_enabled` was set (by someone else) when the run
    /// started: the programs paid for statistics in every measurement.
    #[serde(default)]
    pub stats_sysctl_on: bool,
}

/// The modes `--fallback-max-scale` limits.
pub const FALLBACK_MODES: &[&str] = &["iptables", "nftables", "ipvs"];

/// The modes that serve an IPv6 ClusterIP today (`direct` needs no
/// service): socket LB translates IPv6 at connect(), the per-packet eBPF
/// path on the pods' interfaces (`ebpf-tc`) per packet, the iptables and
/// nftables modes with ip6tables and the `ip6` table; the ipvs mode is
/// IPv4 only so far. The IPv6 metrics (`*_v6*`) run for these and are
/// listed as not run for the others.
pub const IPV6_MODES: &[&str] = &[
    "direct",
    "ebpf-socket",
    "ebpf-tc",
    "ebpf-xdp",
    "iptables",
    "nftables",
];

/// A mode left out at a scale on purpose (not a failure): all of it, or
/// one metric.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NotRun {
    pub mode: String,
    pub scale: usize,
    pub reason: String,
    /// The metric left out; None: every measurement at that scale.
    #[serde(default)]
    pub metric: Option<String>,
}

fn ten() -> u32 {
    10
}

/// Everything one run produced (`benchmarks.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Run {
    pub date: String,
    pub wall_s: f64,
    pub machine: Machine,
    pub params: Params,
    pub modes: Vec<ModeStatus>,
    pub samples: Vec<Sample>,
    pub failures: Vec<Failure>,
    #[serde(default)]
    pub not_run: Vec<NotRun>,
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Median, min and max of repeated runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// None for no values. The median of an even count is the mean of the two
/// middle values.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// `a / b`, None when either is missing or b is 0.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

impl Run {
    /// Summary of (mode, metric, scale) over repeats.
    pub fn summary(&self, mode: &str, metric: &str, scale: Option<usize>) -> Option<Summary> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.mode == mode && s.metric == metric && s.scale == scale)
            .map(|s| s.value)
            .collect();
        summarize(&v)
    }

    pub fn median(&self, mode: &str, metric: &str, scale: Option<usize>) -> Option<f64> {
        self.summary(mode, metric, scale).map(|s| s.median)
    }

    /// The scales a metric was measured at for a mode (None for direct and
    /// for metrics measured once).
    fn rows(&self, metric: &Metric) -> Vec<(String, Option<usize>)> {
        let mut rows = Vec::new();
        for mode in MODES {
            let mut scales: Vec<Option<usize>> = self
                .samples
                .iter()
                .filter(|s| s.mode == *mode && s.metric == metric.key)
                .map(|s| s.scale)
                .collect();
            scales.sort();
            scales.dedup();
            if scales.is_empty() && self.failures.iter().any(|f| f.mode == *mode) {
                continue;
            }
            rows.extend(scales.into_iter().map(|s| ((*mode).to_owned(), s)));
        }
        rows
    }

    /// The baseline value for a ratio: `direct` has no scale.
    fn baseline(&self, base: &str, metric: &str, scale: Option<usize>) -> Option<f64> {
        if base == "direct" {
            self.median("direct", metric, scale)
                .or_else(|| self.median("direct", metric, None))
        } else {
            self.median(base, metric, scale)
        }
    }

    /// The values of (mode, metric, scale) in round order.
    pub fn rounds(&self, mode: &str, metric: &str, scale: Option<usize>) -> Vec<(usize, f64)> {
        let mut v: Vec<(usize, f64)> = self
            .samples
            .iter()
            .filter(|s| s.mode == mode && s.metric == metric && s.scale == scale)
            .map(|s| (s.repeat, s.value))
            .collect();
        v.sort_by_key(|(r, _)| *r);
        v
    }

    /// Ratios to `direct` taken within each round (same round, same
    /// scale; `direct` measured once without a scale is used for every
    /// scale), summarized over the rounds.
    pub fn round_ratios(&self, mode: &str, metric: &str, scale: Option<usize>) -> Option<Summary> {
        let mut base = self.rounds("direct", metric, scale);
        if base.is_empty() {
            base = self.rounds("direct", metric, None);
        }
        let ratios: Vec<f64> = self
            .rounds(mode, metric, scale)
            .into_iter()
            .filter_map(|(r, v)| {
                let d = base.iter().find(|(br, _)| *br == r)?.1;
                ratio(Some(v), Some(d))
            })
            .collect();
        summarize(&ratios)
    }
}

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Per-round ratios as `median [min - max]`.
fn fmt_ratio_summary(r: Option<Summary>) -> String {
    match r {
        Some(s) if s.n > 1 => format!("{:.2}x [{:.2} - {:.2}]", s.median, s.min, s.max),
        Some(s) => format!("{:.2}x", s.median),
        None => "-".into(),
    }
}

/// Spread of the rounds, (max - min) / median.
fn fmt_spread(s: &Summary) -> String {
    if s.n < 2 || s.median == 0.0 {
        return "-".into();
    }
    format!("{:.0}%", (s.max - s.min) / s.median.abs() * 100.0)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

fn fmt_scale(s: Option<usize>) -> String {
    s.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
}

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------

/// One of the project's target ratios, evaluated on a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetResult {
    pub target: String,
    pub mode: String,
    /// The measured figure (ratio or absolute), None if not measured.
    pub value: Option<f64>,
    pub goal: f64,
    pub at_least: bool,
    pub unit: &'static str,
}

impl TargetResult {
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.goal
            } else {
                v <= self.goal
            }
        })
    }

    /// How far from the goal, relative (+: better than the goal).
    pub fn margin(&self) -> Option<f64> {
        self.value.map(|v| {
            if self.at_least {
                v / self.goal - 1.0
            } else {
                1.0 - v / self.goal
            }
        })
    }
}

pub fn targets(run: &Run) -> Vec<TargetResult> {
    let big = run.params.scales.iter().copied().max();
    let small = run.params.scales.iter().copied().min();
    let mut out = Vec::new();
    let mut t = |target: String, mode: &str, value: Option<f64>, goal, at_least, unit| {
        out.push(TargetResult {
            target,
            mode: mode.to_owned(),
            value,
            goal,
            at_least,
            unit,
        })
    };
    for mode in ["ebpf-socket", "ebpf-tc"] {
        for k in ["tcp_clusterip_1", "tcp_clusterip_4"] {
            t(
                format!("TCP throughput ({k}) >= 0.97x direct (per-round ratio, median)"),
                mode,
                run.round_ratios(mode, k, None).map(|s| s.median),
                0.97,
                true,
                "x",
            );
        }
    }
    for mode in ["ebpf-socket", "ebpf-tc"] {
        t(
            format!(
                "connection rate >= 1.3x iptables at {} service(s)",
                fmt_scale(small)
            ),
            mode,
            ratio(
                run.median(mode, "conn_rate", small),
                run.median("iptables", "conn_rate", small),
            ),
            1.3,
            true,
            "x",
        );
        t(
            format!(
                "connection rate >= 2x iptables at {} services",
                fmt_scale(big)
            ),
            mode,
            if big == Some(10_000) {
                ratio(
                    run.median(mode, "conn_rate", big),
                    run.median("iptables", "conn_rate", big),
                )
            } else {
                None
            },
            2.0,
            true,
            "x",
        );
    }
    for &scale in &run.params.scales {
        t(
            format!(
                "socket-LB connection rate >= 0.97x direct at {scale} service(s) (per-round ratio, median)"
            ),
            "ebpf-socket",
            run.round_ratios("ebpf-socket", "conn_rate", Some(scale))
                .map(|s| s.median),
            0.97,
            true,
            "x",
        );
        t(
            format!("CPU per connection <= nftables' at {scale} service(s)"),
            "ebpf-tc",
            ratio(
                run.median("ebpf-tc", "conn_cpu", Some(scale)),
                run.median("nftables", "conn_cpu", Some(scale)),
            ),
            1.0,
            false,
            "x",
        );
    }
    for mode in ["ebpf-socket", "ebpf-tc"] {
        let at10k = |k: &str| {
            if run.params.scales.contains(&10_000) {
                run.median(mode, k, Some(10_000))
            } else {
                None
            }
        };
        t(
            "10k-service full sync (agent's elapsed_ms) <= 1000 ms".into(),
            mode,
            at10k("full_sync_agent"),
            1000.0,
            false,
            "ms",
        );
        t(
            "10k-service full sync (wall, start -> sync done) <= 1000 ms".into(),
            mode,
            at10k("full_sync_wall"),
            1000.0,
            false,
            "ms",
        );
        t(
            "agent peak RSS at 10k services <= 64 MiB".into(),
            mode,
            at10k("rss"),
            64.0,
            false,
            "MiB",
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Markdown
// ---------------------------------------------------------------------------

/// Plot file names, relative to the report.
pub const PLOT_CONNRATE: &str = "benchmarks-connrate.png";
pub const PLOT_THROUGHPUT: &str = "benchmarks-throughput.png";

/// The report (`benchmarks.md`), generated from a run.
pub fn render_markdown(run: &Run) -> String {
    let mut s = String::new();
    let p = &run.params;
    let _ = writeln!(
        s,
        "# Benchmarks\n\n<!-- Generated by `cargo xtask bench` from benchmarks.json; do not edit by hand. -->\n"
    );
    let _ = writeln!(s, "- Date: {}", run.date);
    let _ = writeln!(
        s,
        "- Command: `{}` (wall time {:.0} s)",
        p.command, run.wall_s
    );
    let _ = writeln!(
        s,
        "- Machine: kernel {}, {} CPUs ({}), load average {} at the start. The machine is shared with other builds while the benchmark runs: absolute numbers are noisy; compare modes through the ratios measured in the same round.",
        run.machine.kernel,
        run.machine.cpus,
        run.machine.cpu_model,
        if run.machine.load.is_empty() {
            "not recorded"
        } else {
            &run.machine.load
        }
    );
    let _ = writeln!(
        s,
        "- Parameters: {} {}, {} s per measurement; scales {:?} services ({} endpoints each, the measured service among them); up to {} changes per mode and scale, within {} s; {} connection-rate client threads.\n",
        p.repeat,
        if p.interleaved {
            "round(s), modes interleaved"
        } else {
            "repeat(s), one mode after the other"
        },
        p.duration_s,
        p.scales,
        p.endpoints,
        p.changes,
        p.change_budget_s,
        p.threads
    );
    s.push_str(METHOD);
    s.push_str("\n## Modes\n\n| mode | status |\n|---|---|\n");
    for st in &run.modes {
        let status = if st.available {
            "measured".to_owned()
        } else {
            format!(
                "**not available**: {}",
                st.reason.as_deref().unwrap_or("no reason recorded")
            )
        };
        let _ = writeln!(s, "| {} | {} |", st.mode, status.replace('|', "\\|"));
    }
    if !run.failures.is_empty() {
        s.push_str("\n## Failed measurements (no number recorded)\n\n| mode | services | what | error |\n|---|---|---|---|\n");
        for f in &run.failures {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                f.mode,
                fmt_scale(f.scale),
                f.what,
                f.error.replace('|', "\\|").replace('\n', " ")
            );
        }
    }
    if !run.not_run.is_empty() {
        s.push_str("\n## Not run at these scales (on purpose, not failures)\n\n| mode | services | what | why |\n|---|---|---|---|\n");
        for n in &run.not_run {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                n.mode,
                fmt_scale(Some(n.scale)),
                n.metric.as_deref().unwrap_or("everything"),
                n.reason.replace('|', "\\|")
            );
        }
    }
    s.push_str("\n## Results\n\nMedian of the rounds, [min - max], spread = (max - min) / median, n = number of rounds, then the value of every round in order. `/ direct` is the ratio to `direct` taken within each round (same round, same scale), median [min - max] over the rounds; `/ iptables` is this row's median / iptables' median at the same scale. Whether a ratio above 1 is better depends on the metric (see each heading).\n");
    for metric in METRICS {
        let rows = run.rows(metric);
        if rows.is_empty() {
            continue;
        }
        let better = if metric.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(s, "\n### {} ({}, {})\n", metric.title, metric.unit, better);
        if metric.data_path {
            s.push_str("| mode | services | median | min - max | spread | n | rounds | / direct (per round) | / iptables |\n|---|---:|---:|---:|---:|---:|---|---:|---:|\n");
        } else {
            s.push_str("| mode | services | median | min - max | n | / iptables |\n|---|---:|---:|---:|---:|---:|\n");
        }
        for (mode, scale) in rows {
            let Some(sum) = run.summary(&mode, metric.key, scale) else {
                continue;
            };
            let vs_ipt = ratio(
                Some(sum.median),
                run.baseline("iptables", metric.key, scale),
            );
            let range = format!("{} - {}", fmt_num(sum.min), fmt_num(sum.max));
            if metric.data_path {
                let vs_direct = run.round_ratios(&mode, metric.key, scale);
                let rounds: Vec<String> = run
                    .rounds(&mode, metric.key, scale)
                    .iter()
                    .map(|(_, v)| fmt_num(*v))
                    .collect();
                let _ = writeln!(
                    s,
                    "| {mode} | {} | {} | {range} | {} | {} | {} | {} | {} |",
                    fmt_scale(scale),
                    fmt_num(sum.median),
                    fmt_spread(&sum),
                    sum.n,
                    rounds.join(" / "),
                    fmt_ratio_summary(vs_direct),
                    fmt_ratio(vs_ipt)
                );
            } else {
                let _ = writeln!(
                    s,
                    "| {mode} | {} | {} | {range} | {} | {} |",
                    fmt_scale(scale),
                    fmt_num(sum.median),
                    sum.n,
                    fmt_ratio(vs_ipt)
                );
            }
        }
    }
    render_bpf(run, &mut s);
    s.push_str("\n## Targets (goals, not test assertions)\n\n| target | mode | measured | goal | met | margin |\n|---|---|---:|---:|---|---:|\n");
    for t in targets(run) {
        let (value, met, margin) = match (t.value, t.met(), t.margin()) {
            (Some(v), Some(m), Some(g)) => (
                format!("{}{}", fmt_num(v), t.unit_suffix()),
                if m { "yes" } else { "**no**" }.to_owned(),
                format!("{:+.1}%", g * 100.0),
            ),
            _ => {
                let scale = if t.target.contains("10k") || t.target.contains("at 10000") {
                    Some(10_000)
                } else {
                    None
                };
                let failed = run
                    .failures
                    .iter()
                    .find(|f| f.mode == t.mode && (scale.is_none() || f.scale == scale));
                let skipped = scale.and_then(|sc| {
                    run.not_run
                        .iter()
                        .find(|n| n.mode == t.mode && n.scale == sc && n.metric.is_none())
                });
                let why = match (failed, scale) {
                    _ if skipped.is_some() => {
                        format!("not run: {}", skipped.map_or("", |n| n.reason.as_str()))
                    }
                    (Some(f), _) => format!("not measured: {}", f.error.replace('|', "\\|")),
                    (None, Some(_)) if !run.params.scales.contains(&10_000) => {
                        "not measured (10000 not among the scales)".into()
                    }
                    _ => "not measured".into(),
                };
                (why, "-".into(), "-".into())
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {}{}{} | {} | {} |",
            t.target,
            t.mode,
            value,
            if t.at_least { ">= " } else { "<= " },
            fmt_num(t.goal),
            t.unit_suffix(),
            met,
            margin
        );
    }
    let _ = writeln!(
        s,
        "\n## Plots\n\n![connection rate vs services]({PLOT_CONNRATE})\n\n![throughput per mode]({PLOT_THROUGHPUT})"
    );
    s
}

/// The eBPF programs' own cost per run, per measurement (median over the
/// rounds), from the kernel's BPF statistics.
fn render_bpf(run: &Run, s: &mut String) {
    let mut keys: Vec<(String, String, Option<usize>)> = run
        .samples
        .iter()
        .filter_map(|x| {
            x.metric
                .strip_prefix(BPF_NS)
                .map(|k| (x.mode.clone(), k.to_owned(), x.scale))
        })
        .collect();
    keys.sort_by(|a, b| {
        let pos = |m: &str| MODES.iter().position(|x| *x == m).unwrap_or(usize::MAX);
        (pos(&a.0), &a.1, a.2).cmp(&(pos(&b.0), &b.1, b.2))
    });
    keys.dedup();
    if keys.is_empty() {
        return;
    }
    let source = if run.params.stats_pass_s > 0.0 {
        format!(
            "From the kernel's BPF statistics, on only during a separate {} s statistics pass after each measurement (the same measurement again; counting costs two clock reads per program run, so rates and throughput are measured with it off{})",
            fmt_num(run.params.stats_pass_s),
            if run.params.stats_sysctl_on {
                "; but `kernel.bpf_stats_enabled` was set by someone else during this run, so every measurement paid for it"
            } else {
                ""
            }
        )
    } else {
        "From `kernel.bpf_stats_enabled` (on during the whole run, rate measurements included)"
            .to_owned()
    };
    let _ = write!(
        s,
        "\n## eBPF programs' own cost\n\n{source}: per program of the mode's agents (both nodes, summed by name), run time / runs over the pass; median [min - max] over the rounds. Runs are per connection for `conn_rate`, per 1500 bytes received for iperf3.\n\n| mode | services | measurement | program | ns per run | runs per unit |\n|---|---:|---|---|---:|---:|\n"
    );
    for (mode, k, scale) in keys {
        let Some((what, prog)) = k.split_once('.') else {
            continue;
        };
        let Some(ns) = run.summary(&mode, &format!("{BPF_NS}{k}"), scale) else {
            continue;
        };
        let runs = run
            .median(&mode, &format!("{BPF_RUNS}{k}"), scale)
            .map(fmt_num)
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "| {mode} | {} | {what} | {prog} | {} [{} - {}] | {runs} |",
            fmt_scale(scale),
            fmt_num(ns.median),
            fmt_num(ns.min),
            fmt_num(ns.max)
        );
    }
}

impl TargetResult {
    fn unit_suffix(&self) -> String {
        match self.unit {
            "x" => "x".into(),
            u => format!(" {u}"),
        }
    }
}

const METHOD: &str = "## Method

- Topology: every mode has its own test cluster of network namespaces (2 nodes on an underlay bridge, 2 pods per node, an external client on the underlay), its own cgroups and its own echo server, so all modes' agents stay up side by side. The client pod is pod-1-1 on node1; the server is pod-2-1 on node2 (cross-node); NodePort traffic comes from the external client to node1's address and is forwarded (SNAT) to pod-2-1.
- Client processes run in the client pod's network namespace *and* in node1's test cgroup of that mode, the cgroup the agent's socket-LB hooks are attached to in `ebpf-socket` mode (never the machine's root cgroup).
- Modes: `direct` (no service, no agent: client to the pod IP, the physical limit of this path), `ebpf-socket` (`--mode ebpf --socket-lb true --xdp-mode none`: north-south by tc), `ebpf-tc` (`--mode ebpf --socket-lb false --xdp-mode none`: tc per-packet path), `ebpf-xdp` (`ebpf-socket` with XDP on the nodes' external veths; any XDP program there turns TSO off on the veth's peer, so cross-node TCP is segmented in software: the cost shows here), `iptables`, `nftables`, `ipvs`.
- Rounds: at each scale every mode's fixture and agents are set up once (sequentially, so full-sync figures are not disturbed by other syncs), then each round runs every ready mode's measurements once, in mode order (A B C, A B C, ...): drift of the shared machine hits every mode alike. Ratios to `direct` are taken within a round, then summarized (median, min - max over rounds). Afterwards each mode's control-plane figures are taken and its agents stopped.
- Throughput: iperf3 `-J`, TCP with 1 and 4 streams, via the ClusterIP (from the client pod) and via the NodePort (from the external client); UDP with 64-byte payloads at unlimited rate (`-b 0 -l 64`) via the NodePort, rate = datagrams the server received / seconds. Measured with 1 service programmed (first scale only). `direct` uses the pod IP (the external client routes the pod network through node1).
- Connection rate: our `connrate rate` tool, N client threads each looping connect, one 16-byte request, its echo, abortive close (SO_LINGER 0, so no TIME_WAIT reuse collapse), against an echo server (`connrate serve`) in pod-2-1. Its per-connection times give the connect+request latency percentiles.
- IPv6: the measured service is dual-stack (ClusterIPs 10.96.0.10 and fd00:96::10, one EndpointSlice per family, the same pod behind both; the echo and iperf3 servers listen on both families). `conn_rate_v6` (every scale) and `tcp_clusterip_v6_1` (first scale) repeat the connection rate and the 1-stream ClusterIP throughput over IPv6, each mode as a ratio to IPv6 `direct` (the pod's IPv6 address) in the same round. Modes that do not program IPv6 yet are listed under `not run` for these metrics (see `IPV6_MODES`), not as failures.
- CPU cost: whole-machine busy time (user + nice + system + irq + softirq over both CPUs, from /proc/stat) across each measurement, divided by the connections made (us per connection) or by the gigabytes received (CPU s per GB). It counts everything the machine did meanwhile (idle agents of the other modes, other users of a shared machine), so it is compared between modes of the same round, never as an absolute figure.
- eBPF programs' own cost: the kernel counts run time and runs per program only while statistics are on, and counting costs every program run two clock reads (expensive on a virtual machine), which would inflate the very ratios measured. So rates, throughput and CPU per connection are measured with statistics off, and after each connection-rate measurement and each 1-stream TCP iperf3 measurement a separate, short statistics pass (`--stats-duration`, 1 s by default) runs the same measurement again with statistics on (`BPF_ENABLE_STATS`, a reference-counted fd: `kernel.bpf_stats_enabled` is neither needed nor changed; the run warns and the report says so when someone else has that set). Before and after each pass the run time and run count of every program the mode's agents hold are read (their BPF program descriptors' /proc/<pid>/fdinfo `run_time_ns` and `run_cnt`; names from `bpftool prog show`); the table gives ns per run and runs per connection (or per 1500 bytes). A run's figure includes the counting itself (the kernel reads the clock around the program), so short programs look several times dearer than they are; `cargo test -p proxy --test prog_test_run socket_lb_packet_cost -- --ignored --nocapture` gives the warm-cache cost without counting (BPF_PROG_TEST_RUN repeats). The JSON also keeps the pass's own connection rate (`conn_rate_stats_on`), which shows what counting costs.
- Scales per mode: `--fallback-max-scale N` runs iptables, nftables and ipvs only up to N services (listed under `not run at these scales`, not as failures), so one run covers the eBPF modes at larger scales.
- Request/response latency: `connrate latency`, one persistent TCP connection (TCP_NODELAY), back-to-back 16-byte round trips; p50/p99 of all round trips; once as the scheduler places client and server (`rr_*`), once with client and server pinned to the same CPU (`rr_pinned_*`: a second echo server pinned to CPU 0 on its own service port, the client pinned to CPU 0), which removes the cross-CPU wakeup behind the bimodal latency (see the latency notes below).
- Latency notes: round-trip time on this kind of machine is bimodal when client and server run on different CPUs. Each wakeup of the other end then crosses CPUs: the sender's CPU processes the packet in softirq and wakes the receiver on the other CPU with a rescheduling IPI (two per round trip, visible in the `RES` line of /proc/interrupts), and a virtual CPU that was idle (halted: this guest has no cpuidle driver, so idle is HLT) must first be woken by the host, which is what the slow mode costs. Client and server on the same CPU take no IPI at all, so `rr_pinned_*` measures the path itself; `rr_*` (scheduler's placement) is kept to show what an application sees. Holding `/dev/cpu_dma_latency` at 0 changes nothing here (there is no cpuidle driver for it to restrain).
- Scale: N services (the measured one plus N-1 others, each a ClusterIP with one TCP port and an EndpointSlice of `--endpoints` endpoints, 10 by default) are in the fixture before the agents start. A scale at which an agent's first sync fails is reported under failed measurements, with the agent's error, and not measured.
- Control plane, at each scale: full sync (wall time from starting node1's agent to its first `sync done` log line, and the agent's own `elapsed_ms` of that sync); change to data path (the fixture accepts a new ClusterIP service whose EndpointSlice already exists; a `connrate probe` process in the client pod, in the cgroup, connects with a 20 ms timeout every millisecond until it succeeds; p50/p99 over the changes, as many as `--changes` asks for or as fit in `--change-budget` seconds); agent peak RSS (VmHWM of node1's agent after all measurements at that scale); eBPF map memory (sum of `memlock` over the distinct BPF maps the agent holds, from /proc/<pid>/fdinfo).
";

// ---------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Register a TTF for plotters (Debian's fonts-dejavu-core, installed by
/// `cargo xtask setup`).
pub fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| {
                format!("no DejaVuSans.ttf in {FONT_PATHS:?} (install fonts-dejavu-core)")
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

const COLORS: &[(u8, u8, u8)] = &[
    (90, 90, 90),
    (31, 119, 180),
    (44, 160, 44),
    (214, 39, 40),
    (255, 127, 14),
    (148, 103, 189),
];

fn color(mode: &str) -> plotters::style::RGBColor {
    let i = MODES.iter().position(|m| *m == mode).unwrap_or(0);
    let (r, g, b) = COLORS[i % COLORS.len()];
    plotters::style::RGBColor(r, g, b)
}

/// Connection rate (median) vs number of services, one line per mode;
/// `direct` (no services; its figure at the smallest scale) as a dashed
/// horizontal line.
pub fn plot_connrate(run: &Run, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let scales: Vec<usize> = run.params.scales.clone();
    let (Some(&lo), Some(&hi)) = (scales.iter().min(), scales.iter().max()) else {
        anyhow::bail!("no scales");
    };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for mode in MODES.iter().filter(|m| **m != "direct") {
        let pts: Vec<(f64, f64)> = scales
            .iter()
            .filter_map(|&n| {
                run.median(mode, "conn_rate", Some(n))
                    .map(|v| (n.max(1) as f64, v))
            })
            .collect();
        if !pts.is_empty() {
            series.push(((*mode).to_owned(), pts));
        }
    }
    let direct = run.baseline("direct", "conn_rate", Some(lo));
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(direct)
        .fold(1.0f64, f64::max)
        * 1.15;
    let (x0, x1) = (lo.max(1) as f64 / 1.5, hi.max(2) as f64 * 1.5);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "New TCP connections/s via ClusterIP vs services programmed",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("services (log scale)")
        .y_desc("connections/s (median)")
        .x_label_formatter(&|x| format!("{:.0}", x))
        .y_label_formatter(&|y| format!("{:.0}", y))
        .label_style(("sans-serif", 14))
        .draw()?;
    if let Some(d) = direct {
        let c = color("direct");
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, d), (x1, d)],
                8,
                5,
                c.stroke_width(2),
            ))?
            .label("direct (no service)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    for (mode, pts) in &series {
        let c = color(mode);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(mode.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// TCP throughput (median, min-max whiskers) per mode, grouped by test.
pub fn plot_throughput(run: &Run, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let tests = [
        ("tcp_clusterip_1", "ClusterIP 1 stream"),
        ("tcp_clusterip_4", "ClusterIP 4 streams"),
        ("tcp_nodeport_1", "NodePort 1 stream"),
        ("tcp_nodeport_4", "NodePort 4 streams"),
    ];
    let modes: Vec<&str> = MODES
        .iter()
        .copied()
        .filter(|m| tests.iter().any(|(k, _)| run.summary(m, k, None).is_some()))
        .collect();
    let ymax = tests
        .iter()
        .flat_map(|(k, _)| modes.iter().filter_map(|m| run.summary(m, k, None)))
        .map(|s| s.max)
        .fold(1.0f64, f64::max)
        * 1.15;
    let groups = tests.len() as f64;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("iperf3 TCP throughput per mode", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups, 0.0..ymax)?;
    let names: Vec<&str> = tests.iter().map(|(_, n)| *n).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(tests.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("Gbit/s (median; whiskers: min - max)")
        .y_label_formatter(&|y| format!("{:.1}", y))
        .label_style(("sans-serif", 14))
        .draw()?;
    let w = 0.8 / modes.len().max(1) as f64;
    for (mi, mode) in modes.iter().enumerate() {
        let c = color(mode);
        let mut bars = Vec::new();
        let mut whiskers = Vec::new();
        for (gi, (k, _)) in tests.iter().enumerate() {
            if let Some(sum) = run.summary(mode, k, None) {
                let x = gi as f64 + 0.1 + mi as f64 * w;
                bars.push(Rectangle::new(
                    [(x, 0.0), (x + w * 0.9, sum.median)],
                    c.filled(),
                ));
                let xm = x + w * 0.45;
                whiskers.push(PathElement::new(
                    vec![(xm, sum.min), (xm, sum.max)],
                    BLACK.stroke_width(1),
                ));
            }
        }
        chart
            .draw_series(bars)?
            .label(*mode)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart.draw_series(whiskers)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Write `benchmarks.json`, `benchmarks.md` and the plots into `dir`.
pub fn write_report(run: &Run, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(run)?;
    std::fs::write(dir.join("benchmarks.json"), json + "\n")?;
    std::fs::write(dir.join("benchmarks.md"), render_markdown(run))?;
    plot_connrate(run, &dir.join(PLOT_CONNRATE))?;
    plot_throughput(run, &dir.join(PLOT_THROUGHPUT))?;
    Ok(())
}

/// Summaries keyed for quick lookups in tests and the runner's progress.
pub fn medians(run: &Run) -> BTreeMap<(String, String, Option<usize>), f64> {
    let mut keys: Vec<(String, String, Option<usize>)> = run
        .samples
        .iter()
        .map(|s| (s.mode.clone(), s.metric.clone(), s.scale))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| run.median(&k.0, &k.1, k.2).map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_median_min_max() {
        let s = summarize(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        let s = summarize(&[7.0]).expect("one value");
        assert_eq!((s.median, s.min, s.max), (7.0, 7.0, 7.0));
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN]), None);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }

    const FIXED: &str = r#"{
      "date": "2026-01-01T00:00:00Z", "wall_s": 12.0,
      "machine": {"kernel": "6.1.0-test", "cpus": 2, "cpu_model": "Test CPU"},
      "params": {"command": "cargo xtask bench --quick", "duration_s": 1.0, "repeat": 3,
                 "scales": [1, 10000], "changes": 10, "threads": 8},
      "modes": [
        {"mode": "direct", "available": true, "reason": null},
        {"mode": "ebpf-socket", "available": true, "reason": null},
        {"mode": "iptables", "available": true, "reason": null},
        {"mode": "ipvs", "available": false, "reason": "the kernel has no IP_VS"}
      ],
      "samples": [
        {"mode": "direct", "metric": "tcp_clusterip_1", "scale": null, "repeat": 0, "value": 10.0},
        {"mode": "direct", "metric": "tcp_clusterip_1", "scale": null, "repeat": 1, "value": 12.0},
        {"mode": "direct", "metric": "tcp_clusterip_1", "scale": null, "repeat": 2, "value": 11.0},
        {"mode": "ebpf-socket", "metric": "tcp_clusterip_1", "scale": null, "repeat": 0, "value": 10.0},
        {"mode": "iptables", "metric": "tcp_clusterip_1", "scale": null, "repeat": 0, "value": 8.0},
        {"mode": "direct", "metric": "conn_rate", "scale": null, "repeat": 0, "value": 1000.0},
        {"mode": "ebpf-socket", "metric": "conn_rate", "scale": 1, "repeat": 0, "value": 990.0},
        {"mode": "ebpf-socket", "metric": "conn_rate", "scale": 1, "repeat": 1, "value": 970.0},
        {"mode": "ebpf-socket", "metric": "conn_rate", "scale": 1, "repeat": 2, "value": 1010.0},
        {"mode": "iptables", "metric": "conn_rate", "scale": 1, "repeat": 0, "value": 500.0},
        {"mode": "ebpf-socket", "metric": "conn_rate", "scale": 10000, "repeat": 0, "value": 900.0},
        {"mode": "iptables", "metric": "conn_rate", "scale": 10000, "repeat": 0, "value": 300.0},
        {"mode": "ebpf-socket", "metric": "full_sync_agent", "scale": 10000, "repeat": 0, "value": 1500.0},
        {"mode": "ebpf-socket", "metric": "rss", "scale": 10000, "repeat": 0, "value": 40.0}
      ],
      "failures": [
        {"mode": "iptables", "what": "udp64_nodeport", "scale": null, "error": "iperf3 exited 1"},
        {"mode": "ebpf-tc", "what": "agent sync", "scale": 10000, "error": "map BACKENDS full"}
      ]
    }"#;

    fn fixed() -> Run {
        serde_json::from_str(FIXED).expect("fixed JSON parses")
    }

    #[test]
    fn report_from_fixed_json() {
        let run = fixed();
        let md = render_markdown(&run);
        // Header: machine, date, command.
        assert!(md.contains("kernel 6.1.0-test, 2 CPUs (Test CPU)"), "{md}");
        assert!(md.contains("2026-01-01T00:00:00Z"));
        assert!(md.contains("`cargo xtask bench --quick`"));
        // Unavailable mode and failed measurement, with reasons.
        assert!(md.contains("| ipvs | **not available**: the kernel has no IP_VS |"));
        assert!(md.contains("| iptables | - | udp64_nodeport | iperf3 exited 1 |"));
        // Median [min - max], spread, rounds; ratio to direct within each
        // round (round 0: 10 / 10), to iptables' median (8).
        assert!(
            md.contains("| direct | - | 11.00 | 10.00 - 12.00 | 18% | 3 | 10.00 / 12.00 / 11.00 | 1.00x [1.00 - 1.00] | 1.38x |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| ebpf-socket | - | 10.00 | 10.00 - 10.00 | - | 1 | 10.00 | 1.00x | 1.25x |"
            ),
            "{md}"
        );
        // Per-scale rows: direct measured once without a scale serves every
        // scale (only round 0 has a partner: 990 / 1000); iptables at the
        // same scale.
        assert!(
            md.contains("| ebpf-socket | 1 | 990.0 | 970.0 - 1010 | 4% | 3 | 990.0 / 970.0 / 1010 | 0.99x | 1.98x |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| ebpf-socket | 10000 | 900.0 | 900.0 - 900.0 | - | 1 | 900.0 | 0.90x | 3.00x |"
            ),
            "{md}"
        );
        // Control-plane tables have no direct column.
        assert!(
            md.contains("| ebpf-socket | 10000 | 1500 | 1500 - 1500 | 1 | - |"),
            "{md}"
        );
    }

    /// Scales skipped on purpose are listed as such (not as failures), and
    /// the BPF table says where its figures come from.
    #[test]
    fn not_run_scales_and_statistics_passes_are_reported() {
        let mut run = fixed();
        run.samples.push(Sample {
            mode: "ebpf-socket".into(),
            metric: format!("{BPF_NS}conn_rate.tc_from_pod"),
            scale: Some(1),
            repeat: 0,
            value: 50.0,
        });
        assert!(
            render_markdown(&run).contains("on during the whole run"),
            "an older run (no stats_pass_s) says statistics were on throughout"
        );
        run.params.stats_pass_s = 1.0;
        run.not_run.push(NotRun {
            mode: "nftables".into(),
            scale: 100_000,
            reason: "above --fallback-max-scale 10000".into(),
            metric: None,
        });
        run.not_run.push(NotRun {
            mode: "iptables".into(),
            scale: 1,
            reason: "IPv6 not programmed in this mode yet".into(),
            metric: Some("conn_rate_v6".into()),
        });
        let md = render_markdown(&run);
        assert!(
            md.contains("| nftables | 100000 | everything | above --fallback-max-scale 10000 |"),
            "{md}"
        );
        assert!(
            md.contains("| iptables | 1 | conn_rate_v6 | IPv6 not programmed in this mode yet |"),
            "{md}"
        );
        assert!(!md.contains("| nftables | 100000 | not run"), "{md}");
        assert!(md.contains("separate 1.000 s statistics pass"), "{md}");
    }

    /// Ratios are taken within a round: with drift that moves both modes
    /// alike, the per-round ratio stays put while the medians' ratio does
    /// not.
    #[test]
    fn ratios_are_taken_within_each_round() {
        let mut run = fixed();
        run.samples.clear();
        for (r, (d, e)) in [(1000.0, 950.0), (600.0, 570.0), (1100.0, 1045.0)]
            .into_iter()
            .enumerate()
        {
            for (mode, v) in [("direct", d), ("ebpf-socket", e)] {
                run.samples.push(Sample {
                    mode: mode.into(),
                    metric: "conn_rate".into(),
                    scale: Some(1),
                    repeat: r,
                    value: v,
                });
            }
        }
        let s = run
            .round_ratios("ebpf-socket", "conn_rate", Some(1))
            .expect("ratios");
        assert!((s.median - 0.95).abs() < 1e-9 && (s.max - s.min).abs() < 1e-9);
        assert_eq!(s.n, 3);
        // The median of one mode and of the other come from different
        // rounds here (950 and 1000): 0.95 as well, but only by luck.
        let md = render_markdown(&run);
        assert!(
            md.contains("| ebpf-socket | 1 | 950.0 | 570.0 - 1045 | 50% | 3 | 950.0 / 570.0 / 1045 | 0.95x [0.95 - 0.95] | - |"),
            "{md}"
        );
    }

    #[test]
    fn targets_from_fixed_json() {
        let run = fixed();
        let t = targets(&run);
        let find = |mode: &str, prefix: &str| {
            t.iter()
                .find(|t| t.mode == mode && t.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("no target {prefix} for {mode}"))
        };
        let tp = find("ebpf-socket", "TCP throughput (tcp_clusterip_1)");
        // Within round 0: 10 / 10 (the medians' ratio would be 10 / 11).
        assert_eq!(tp.value, Some(1.0));
        assert_eq!(tp.met(), Some(true));
        let cr = find("ebpf-socket", "connection rate >= 1.3x");
        assert_eq!(cr.value, Some(990.0 / 500.0));
        assert_eq!(cr.met(), Some(true));
        let big = find("ebpf-socket", "connection rate >= 2x");
        assert_eq!(big.value, Some(3.0));
        let sync = find("ebpf-socket", "10k-service full sync (agent");
        assert_eq!(sync.met(), Some(false));
        assert!((sync.margin().expect("margin") + 0.5).abs() < 1e-9); // 50 % over
        assert_eq!(find("ebpf-socket", "agent peak RSS").met(), Some(true));
        // Not measured: no verdict.
        assert_eq!(find("ebpf-tc", "agent peak RSS").met(), None);
        let md = render_markdown(&run);
        assert!(
            md.contains("| agent peak RSS at 10k services <= 64 MiB | ebpf-tc | not measured: map BACKENDS full |"),
            "{md}"
        );
        let md = render_markdown(&run);
        assert!(md.contains("| 10k-service full sync (agent's elapsed_ms) <= 1000 ms | ebpf-socket | 1500 ms | <= 1000 ms | **no** | -50.0% |"), "{md}");
    }

    #[test]
    fn plots_render_from_fixed_json() {
        if register_font().is_err() {
            eprintln!("skipping: no DejaVu font (cargo xtask setup installs fonts-dejavu-core)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bench-plot-test-{}", std::process::id()));
        write_report(&fixed(), &dir).expect("report");
        for f in [
            PLOT_CONNRATE,
            PLOT_THROUGHPUT,
            "benchmarks.md",
            "benchmarks.json",
        ] {
            let len = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
            assert!(len > 1000 || f.ends_with("json"), "{f}: {len} bytes");
        }
        let back: Run = serde_json::from_slice(
            &std::fs::read(dir.join("benchmarks.json")).expect("json written"),
        )
        .expect("json parses");
        assert_eq!(back, fixed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
