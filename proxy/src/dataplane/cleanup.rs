//! Removing what each mode leaves in the kernel, so a node can switch modes
//! (as kube-proxy's `--cleanup`): eBPF pins (maps and links: unpinning a
//! link detaches its program), our iptables and ip6tables chains and jumps,
//! our nftables tables (`ip` and `ip6`), IPVS virtual servers and `kube-ipvs0`.

use std::{fs, io, path::Path};

use tracing::{info, warn};

use super::{iptables, ipvs, nftables};

/// The modes with kernel state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateOf {
    Ebpf,
    Iptables,
    Nftables,
    Ipvs,
}

/// Remove everything pinned under `bpffs_path`. Returns whether it existed.
pub fn ebpf(bpffs_path: &Path) -> io::Result<bool> {
    match fs::remove_dir_all(bpffs_path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove the state of every mode but `keep` (all when None). Failures are
/// logged and counted; the rest still goes.
pub fn all_but(keep: Option<StateOf>, bpffs_path: &Path) -> usize {
    let mut failures = 0;
    let mut report = |what: &str, r: Result<bool, String>| match r {
        Ok(true) => info!(what, "removed state of another mode"),
        Ok(false) => {}
        Err(e) => {
            warn!(what, error = %e, "cleanup failed");
            failures += 1;
        }
    };
    if keep != Some(StateOf::Ebpf) {
        report(
            "eBPF pins",
            ebpf(bpffs_path).map_err(|e| format!("{}: {e}", bpffs_path.display())),
        );
    }
    if keep != Some(StateOf::Iptables) {
        report(
            "iptables chains",
            iptables::cleanup().map_err(|e| e.to_string()),
        );
    }
    if keep != Some(StateOf::Nftables) {
        report(
            "nftables tables",
            nftables::cleanup().map_err(|e| e.to_string()),
        );
    }
    if keep != Some(StateOf::Ipvs) {
        // Flushes every virtual server, as kube-proxy's ipvs cleanup does.
        report("IPVS", ipvs::cleanup().map_err(|e| e.to_string()));
    }
    failures
}
