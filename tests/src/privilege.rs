//! The agent's privileges as deploy/'s DaemonSet grants them, so scenarios
//! can run the agent with exactly those (see [`crate::agent::AgentOptions`]).

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::rbac::{AGENT_NAME, agent_manifest};

/// What containerd and Docker give a container before `capabilities.add`
/// and `drop` (their default set). `drop: [ALL]` removes all of it.
pub const RUNTIME_DEFAULT_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The capabilities the DaemonSet's `agent` container runs with: the
/// runtime's default set less `securityContext.capabilities.drop` (`ALL`
/// drops every one) plus `add`, in Kubernetes' spelling (`NET_ADMIN`).
pub fn agent_capabilities() -> Result<BTreeSet<String>> {
    let ds = agent_manifest("DaemonSet", AGENT_NAME)?;
    let container = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("DaemonSet has no containers")?
        .iter()
        .find(|c| c["name"] == "agent")
        .context("DaemonSet has no container named agent")?;
    let sc = &container["securityContext"];
    if sc["privileged"] == true {
        bail!("the agent container is privileged: every capability");
    }
    let list = |key: &str| -> Result<Vec<String>> {
        match &sc["capabilities"][key] {
            Value::Null => Ok(Vec::new()),
            Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("capabilities.{key}: {v} is not a string"))
                })
                .collect(),
            other => bail!("capabilities.{key}: {other} is not a list"),
        }
    };
    let drop = list("drop")?;
    let mut caps: BTreeSet<String> = if drop.iter().any(|d| d == "ALL") {
        BTreeSet::new()
    } else {
        RUNTIME_DEFAULT_CAPABILITIES
            .iter()
            .filter(|c| !drop.iter().any(|d| d == *c))
            .map(|c| (*c).to_owned())
            .collect()
    };
    caps.extend(list("add")?);
    Ok(caps)
}

/// `setpriv` arguments that leave a root process exactly `caps` (bounding
/// set; inheritable and ambient sets emptied, so exec adds nothing).
pub fn setpriv_args(caps: &BTreeSet<String>) -> Vec<String> {
    let bounding: Vec<String> = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect();
    vec![
        "--bounding-set".into(),
        bounding.join(","),
        "--inh-caps".into(),
        "-all".into(),
        "--ambient-caps".into(),
        "-all".into(),
        "--".into(),
    ]
}

/// A process's effective capabilities (`CapEff` of /proc/<pid>/status),
/// in Kubernetes' spelling.
pub fn effective_capabilities(pid: u32) -> Result<BTreeSet<String>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line")?
        .trim();
    let mask = u64::from_str_radix(hex, 16).with_context(|| format!("CapEff {hex:?}"))?;
    Ok((0..64)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| {
            CAPABILITY_NAMES
                .get(bit)
                .map_or_else(|| format!("CAP_{bit}"), |n| (*n).to_owned())
        })
        .collect())
}

/// Capability names by number (linux/capability.h).
const CAPABILITY_NAMES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_numbers_match_the_kernel() {
        // Spot checks against linux/capability.h.
        assert_eq!(CAPABILITY_NAMES[12], "NET_ADMIN");
        assert_eq!(CAPABILITY_NAMES[21], "SYS_ADMIN");
        assert_eq!(CAPABILITY_NAMES[38], "PERFMON");
        assert_eq!(CAPABILITY_NAMES[39], "BPF");
        let me = effective_capabilities(std::process::id()).expect("own status");
        assert!(me.contains("NET_ADMIN"), "tests run as root: {me:?}");
    }

    #[test]
    fn setpriv_leaves_exactly_the_set() {
        let caps: BTreeSet<String> = ["NET_ADMIN", "BPF"].map(str::to_owned).into();
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(setpriv_args(&caps)).args(["sleep", "5"]);
        let mut child = cmd.spawn().expect("setpriv");
        // setpriv execs sleep in place: wait until it has.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::fs::read_to_string(format!("/proc/{}/comm", child.id()))
            .is_ok_and(|c| c.trim() != "sleep")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let got = effective_capabilities(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(got.expect("status"), caps);
    }
}
