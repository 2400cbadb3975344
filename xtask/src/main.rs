//! Project tasks: `cargo xtask setup | demo | test | bench`.

mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, demo and test tasks for the eBPF service proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make this machine ready: Debian packages, rust-src, bpf-linker, bpffs. Idempotent.
    Setup,
    /// Setup, build, then run the demo: netns cluster + API server fixture +
    /// agent, requests to a ClusterIP, `proxyctl dump-maps`.
    Demo,
    /// Setup, build, then run every test (unit, BPF_PROG_TEST_RUN, scenarios).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, release build, then benchmark every mode side by side
    /// (iperf3, connection rate, latency, 1 to 10k services); writes
    /// docs/benchmarks.{md,json} and PNG plots. Flags go to the runner:
    /// `--quick`, `--repeat N`, `--duration S`, `--scales 1,1000,10000`,
    /// `--modes direct,ebpf-socket,...`, `--changes N`, `--out DIR`.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Demo => {
            setup::setup()?;
            build_bins()?;
            run(cargo().args(["run", "--quiet", "-p", "proxy-tests", "--bin", "demo"]))
        }
        Cmd::Test { args } => {
            setup::setup()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            build_bins()?;
            run(cargo().arg("test").args(&args))?;
            // Benchmark smoke run (every mode produces numbers; no
            // performance assertion), into a scratch directory.
            let out =
                std::env::temp_dir().join(format!("proxy-bench-quick-{}", std::process::id()));
            bench(&[
                "--quick".to_owned(),
                "--out".to_owned(),
                out.display().to_string(),
            ])
        }
        Cmd::Bench { args } => {
            setup::setup()?;
            bench(&args)
        }
    }
}

/// Release-build the agent and the benchmark tools, then run the runner
/// (tests/src/bin/bench.rs) against target/release. xtask itself depends
/// on neither crate: setup must work before bpf-linker exists.
fn bench(args: &[String]) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "proxy", "--bins"]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "proxy-tests",
        "--bin",
        "bench",
        "--bin",
        "connrate",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let release = target.join("release");
    run(Command::new(release.join("bench"))
        .args(args)
        .env("PROXY_BIN_DIR", &release))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The scenario tests and the demo run the real `proxy` and `proxyctl`.
fn build_bins() -> Result<()> {
    run(cargo().args(["build", "-p", "proxy", "--bins"]))
}

/// Run a command, inheriting stdio; fail with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// True when the command starts and exits 0 (output discarded).
pub fn cmd_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
