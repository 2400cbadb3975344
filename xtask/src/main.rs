//! Project tasks: `cargo xtask setup | demo | test | bench | kind | vm-test ipvs`.

mod kind;
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
    /// Make this machine ready: Debian packages, rust-src, bpf-linker, bpffs,
    /// kubernetes-validate. Idempotent.
    Setup,
    /// Setup, build, then run the demo: netns cluster + API server fixture +
    /// agent, requests to a ClusterIP, `proxyctl dump-maps`.
    Demo,
    /// Setup, `cargo fmt --check`, `cargo clippy --all-targets -D warnings`,
    /// build, then run every test (unit, BPF_PROG_TEST_RUN, scenarios).
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
    /// kind cluster without kube-proxy (deploy/kind-config.yaml), image
    /// built and loaded, manifests applied, smoke check. Needs docker, kind
    /// and kubectl.
    Kind,
    /// Tests needing a kernel feature this machine lacks, in a qemu VM
    /// (software emulation) booting Debian's kernel: `ipvs`.
    VmTest {
        #[arg(value_enum)]
        target: VmTarget,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VmTarget {
    /// `--mode ipvs` serving a ClusterIP and a NodePort (ip_vs modules).
    Ipvs,
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
            // Lints of the host members (default-members; the eBPF crate is
            // built for its own target by proxy/build.rs), warnings denied.
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            build_bins()?;
            run(cargo().arg("test").args(&args))?;
            // The whole suite includes the VM test and a benchmark smoke
            // run (every mode produces numbers; no performance assertion,
            // debug binaries, scratch output); a filtered run does not.
            if args.is_empty() {
                vm_test(VmTarget::Ipvs)?;
                let out =
                    std::env::temp_dir().join(format!("proxy-bench-quick-{}", std::process::id()));
                bench(
                    Profile::Debug,
                    &[
                        "--quick".to_owned(),
                        "--out".to_owned(),
                        out.display().to_string(),
                    ],
                )?;
            }
            Ok(())
        }
        Cmd::Bench { args } => {
            setup::setup()?;
            bench(Profile::Release, &args)
        }
        Cmd::VmTest { target } => {
            build_bins()?;
            vm_test(target)
        }
        Cmd::Kind => kind::kind(),
    }
}

/// qemu (installed on first use) and the ignored VM test, which downloads
/// the kernel and busybox .debs through apt on first use.
fn vm_test(target: VmTarget) -> Result<()> {
    if !cmd_ok(Command::new("qemu-system-x86_64").arg("--version")) {
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "qemu-system-x86",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let test = match target {
        VmTarget::Ipvs => "vm_ipvs",
    };
    run(cargo().args([
        "test",
        "-p",
        "proxy-tests",
        "--test",
        test,
        "--",
        "--ignored",
        "--nocapture",
    ]))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

/// Build the agent and the benchmark tools (release for real numbers,
/// debug for the smoke run in `test`), then run the runner
/// (tests/src/bin/bench.rs) against those binaries. xtask itself depends on
/// neither crate: setup must work before bpf-linker exists.
fn bench(profile: Profile, args: &[String]) -> Result<()> {
    let release = profile == Profile::Release;
    let flag: &[&str] = if release { &["--release"] } else { &[] };
    run(cargo()
        .arg("build")
        .args(flag)
        .args(["-p", "proxy", "--bins"]))?;
    run(cargo().arg("build").args(flag).args([
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
    let dir = target.join(if release { "release" } else { "debug" });
    // Agents log at `info`, as deployed (see tests/src/agent.rs).
    run(Command::new(dir.join("bench"))
        .args(args)
        .env("PROXY_BIN_DIR", &dir)
        .env("PROXY_TEST_AGENT_LOG", "info"))
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
