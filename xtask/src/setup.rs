//! `cargo xtask setup`: make a fresh machine of this kind ready, idempotently.
//!
//! Every step first checks whether its work is already done and returns at
//! once if so, so a second run finishes in seconds.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{cmd_ok, run};

/// Debian packages the demo, the tests, the fallback modes and the benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "iptables",
    "nftables",
    "ipvsadm",
    // kube-proxy's ipvs mode keeps its addresses and ports in ip sets.
    "ipset",
    "conntrack",
    "bpftool",
    "ethtool",
    // The benchmark plots' text (plotters loads DejaVuSans.ttf at runtime).
    "fonts-dejavu-core",
];

/// The nightly toolchain that builds the eBPF crate (preinstalled on this kind).
pub const NIGHTLY: &str = "nightly";
/// bpf-linker release known to build against LLVM 22 with `--features llvm-22`.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// kubernetes-validate (PyPI): offline strict validation of deploy/ against
/// the Kubernetes JSON schemas it ships (tests/tests/deploy.rs).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn setup() -> Result<()> {
    if !is_root() {
        bail!("setup must run as root: it installs Debian packages and mounts bpffs");
    }
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    kubernetes_validate()?;
    eprintln!("setup: ready");
    Ok(())
}

fn is_root() -> bool {
    // Ask `id` rather than pulling libc into xtask.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the {NIGHTLY} toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The nightly toolchain's `lib/` directory, which holds its libLLVM.
fn nightly_lib_dir() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args([&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .output()
        .context("running rustc +nightly --print sysroot")?;
    if !out.status.success() {
        bail!("the {NIGHTLY} toolchain is missing; this machine kind ships it preinstalled");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib"))
}

fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    for entry in fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libLLVM.so.") {
            return Ok(path);
        }
    }
    bail!("no libLLVM.so.* in {}", lib.display())
}

fn bpf_linker() -> Result<()> {
    let lib = nightly_lib_dir()?;
    let libllvm = find_libllvm(&lib)?;
    if cmd_ok(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    // llvm-sys wants an LLVM_PREFIX whose lib/ holds libLLVM.so; point it at
    // the nightly toolchain's own copy so the linker and rustc agree on LLVM.
    let home = env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(".cache/proxy-build/llvm-22");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?
        .to_owned();
    for link in [PathBuf::from("libLLVM.so"), PathBuf::from(&soname)] {
        let at = prefix_lib.join(link);
        let _ = fs::remove_file(&at);
        symlink(&libllvm, &at).with_context(|| format!("linking {}", at.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {}",
        libllvm.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", &prefix)
        // Find the toolchain's libLLVM at run time without LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        ))?;
    if !cmd_ok(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but does not run");
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn kubernetes_validate() -> Result<()> {
    let installed = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE_VERSION)
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    if !cmd_ok(Command::new("python3").args(["-m", "pip", "--version"])) {
        bail!("kubernetes-validate needs pip: `python3 -m pip --version` does not run");
    }
    eprintln!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} from PyPI");
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))?;
    if !cmd_ok(Command::new("kubernetes-validate").arg("--version")) {
        bail!(
            "kubernetes-validate was installed but is not on PATH (see `python3 -m pip show -f kubernetes-validate`)"
        );
    }
    Ok(())
}
