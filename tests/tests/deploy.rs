//! The manifests in deploy/: strict schema validation against Kubernetes
//! 1.32 (kubernetes-validate, offline), the DaemonSet's container args
//! parsed by the agent's own parser, and the rules the API server enforces
//! that the schemas do not express.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::Parser as _;
use proxy::cli::Args;
use proxy_tests::rbac::{AGENT_NAME, agent_manifest, deploy_dir, manifests_in, yaml_documents};
use serde_json::Value;

/// Kubernetes version the manifests must validate against.
const K8S_VERSION: &str = "1.32.0";
/// Directories of Kubernetes manifests (deploy/kind-config.yaml is kind's
/// own format, checked by `kind_config_*` below).
const MANIFEST_DIRS: &[&str] = &["manifests", "smoke", "bench"];
/// Stand-in for the node name the kubelet puts in NODE_NAME.
const NODE_PLACEHOLDER: &str = "kind-worker";

fn manifest_files() -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for d in MANIFEST_DIRS {
        let dir = deploy_dir().join(d);
        for (path, _) in manifests_in(&dir)? {
            if !files.contains(&path) {
                files.push(path);
            }
        }
    }
    if files.is_empty() {
        bail!("no manifests found under {}", deploy_dir().display());
    }
    Ok(files)
}

#[test]
fn every_manifest_validates_strictly() -> Result<()> {
    // Fail, never skip, when the validator is missing.
    let version = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .context(
            "kubernetes-validate is not installed (or not on PATH): run `cargo xtask setup`, \
             which installs the pinned version from PyPI",
        )?;
    if !version.status.success() {
        bail!("kubernetes-validate --version failed: {version:?}");
    }
    let mut failures = Vec::new();
    let mut resources = 0;
    for f in manifest_files()? {
        let out = Command::new("kubernetes-validate")
            .args(["-k", K8S_VERSION, "--strict"])
            .arg(&f)
            .output()
            .with_context(|| format!("running kubernetes-validate on {}", f.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = yaml_documents(&f)?.len();
        let passed = text.lines().filter(|l| l.contains(" passed ")).count();
        // A WARN is a document it could not check (unknown kind or version):
        // as bad as an error here.
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.starts_with("WARN"))
            .collect();
        if !out.status.success() || !bad.is_empty() || passed != docs {
            failures.push(format!(
                "{} ({} of {docs} documents passed, exit {}):\n{text}",
                f.display(),
                passed,
                out.status
            ));
        }
        resources += passed;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("kubernetes-validate {K8S_VERSION} --strict: {resources} resources passed");
    Ok(())
}

#[test]
fn kind_config_is_dual_stack_without_kube_proxy_and_has_two_workers() -> Result<()> {
    let docs = yaml_documents(&deploy_dir().join("kind-config.yaml"))?;
    let [cfg] = docs.as_slice() else {
        bail!(
            "kind-config.yaml: expected one document, found {}",
            docs.len()
        );
    };
    assert_eq!(cfg["kind"], "Cluster");
    assert_eq!(cfg["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(cfg["networking"]["kubeProxyMode"], "none");
    assert_eq!(cfg["networking"]["ipFamily"], "dual");
    // The IPv4 pod network is the one the DaemonSet passes as
    // --cluster-cidr.
    let pods = cfg["networking"]["podSubnet"]
        .as_str()
        .context("podSubnet")?;
    let ds = serde_json::to_string(&daemonset()?)?;
    let v4 = pods
        .split(',')
        .find(|c| !c.contains(':'))
        .context("an IPv4 pod subnet")?;
    assert!(
        pods.split(',').any(|c| c.contains(':')),
        "an IPv6 pod subnet"
    );
    assert!(
        ds.contains(&format!("--cluster-cidr={v4}")),
        "--cluster-cidr={v4} in the DaemonSet"
    );
    let roles: Vec<&str> = cfg["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["role"].as_str())
        .collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
    Ok(())
}

fn daemonset() -> Result<Value> {
    agent_manifest("DaemonSet", AGENT_NAME)
}

fn agent_container(ds: &Value) -> Result<&Value> {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("DaemonSet has no containers")?
        .iter()
        .find(|c| c["name"] == "agent")
        .context("DaemonSet has no container named agent")
}

/// The container's environment as the kubelet would build it: literal
/// values, ConfigMap keys from deploy/'s ConfigMaps, and the node name
/// (downward API) as [`NODE_PLACEHOLDER`].
fn container_env(c: &Value) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env entry without name")?;
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if let Some(r) = e["valueFrom"].get("configMapKeyRef") {
            let cm_name = r["name"].as_str().context("configMapKeyRef.name")?;
            let key = r["key"].as_str().context("configMapKeyRef.key")?;
            let cm = agent_manifest("ConfigMap", cm_name)?;
            cm["data"][key]
                .as_str()
                .with_context(|| format!("env {name}: ConfigMap {cm_name} has no key {key:?}"))?
                .to_owned()
        } else if let Some(r) = e["valueFrom"].get("fieldRef") {
            match r["fieldPath"].as_str() {
                Some("spec.nodeName") => NODE_PLACEHOLDER.to_owned(),
                other => bail!("env {name}: unexpected fieldRef {other:?}"),
            }
        } else {
            bail!("env {name}: neither value, configMapKeyRef nor fieldRef");
        };
        env.insert(name.to_owned(), value);
    }
    Ok(env)
}

/// Kubernetes' `$(VAR)` expansion in command/args; `$$` is a literal `$`.
/// An undefined variable is an error here (the kubelet would leave it as
/// is, and the agent would get a literal `$(VAR)`).
fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let var = &inner[..end];
            let v = env
                .get(var)
                .with_context(|| format!("arg {arg:?}: $({var}) is not in the container's env"))?;
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn mount_path_of_host_path(ds: &Value, c: &Value, host_path: &str) -> Result<String> {
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find(|v| v["hostPath"]["path"] == host_path)
        .with_context(|| format!("no hostPath volume for {host_path}"))?;
    let mount = c["volumeMounts"]
        .as_array()
        .context("volumeMounts")?
        .iter()
        .find(|m| m["name"] == volume["name"])
        .with_context(|| format!("the agent does not mount {host_path}"))?;
    Ok(mount["mountPath"].as_str().context("mountPath")?.to_owned())
}

#[test]
fn daemonset_args_parse_with_the_agents_parser() -> Result<()> {
    let ds = daemonset()?;
    let c = agent_container(&ds)?;
    let env = container_env(c)?;
    let command: Vec<&str> = c["command"]
        .as_array()
        .context("agent container has no command")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(command, ["/usr/local/bin/proxy"]);
    let mut argv = vec!["proxy".to_owned()];
    for a in c["args"]
        .as_array()
        .context("agent container has no args")?
    {
        argv.push(expand(a.as_str().context("non-string arg")?, &env)?);
    }
    let args = Args::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("the agent refuses the DaemonSet's args {argv:?}:\n{e}"))?;
    eprintln!("parsed {argv:?}");

    assert_eq!(args.hostname_override.as_deref(), Some(NODE_PLACEHOLDER));
    // In-cluster configuration (checked on argv: clap would also read a
    // KUBECONFIG from this test's own environment).
    assert!(!argv.iter().any(|a| a.starts_with("--kubeconfig")));
    // Pins go on the host's bpffs, so they outlive the pod.
    let bpffs = mount_path_of_host_path(&ds, c, "/sys/fs/bpf")?;
    assert!(
        args.bpffs_path.starts_with(&bpffs) && args.bpffs_path != Path::new(&bpffs),
        "--bpffs-path {} is not a directory on the bpffs mount {bpffs}",
        args.bpffs_path.display()
    );
    // Socket hooks on the host's cgroup2 root (not the container's own).
    let cgroup = mount_path_of_host_path(&ds, c, "/sys/fs/cgroup")?;
    assert_eq!(args.cgroup_path.as_deref(), Some(Path::new(&cgroup)));
    assert!(args.socket_lb);
    // In-cluster config reaches the API server without the kubernetes
    // ClusterIP (no kube-proxy yet).
    assert_eq!(
        env.get("KUBERNETES_SERVICE_HOST").map(String::as_str),
        Some("kind-control-plane")
    );
    assert_eq!(
        env.get("KUBERNETES_SERVICE_PORT").map(String::as_str),
        Some("6443")
    );
    Ok(())
}

#[test]
fn every_configmap_mode_value_is_one_the_agent_accepts() -> Result<()> {
    // The one field that switches the dataplane goes through --mode.
    let cm = agent_manifest("ConfigMap", AGENT_NAME)?;
    let mode = cm["data"]["mode"]
        .as_str()
        .context("ConfigMap has no mode")?;
    Args::try_parse_from(["proxy", "--mode", mode])
        .map_err(|e| anyhow::anyhow!("ConfigMap mode {mode:?}: {e}"))?;
    // And a value the agent does not know is refused, so the check means
    // something.
    assert!(Args::try_parse_from(["proxy", "--mode", "no-such-mode"]).is_err());
    Ok(())
}

/// What the API server (not the schemas) refuses or what the design needs.
#[test]
fn daemonset_follows_the_api_servers_rules_and_the_design() -> Result<()> {
    let ds = daemonset()?;
    let pod = &ds["spec"]["template"]["spec"];
    let all: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect();
    // "Bidirectional mount propagation is available only to privileged
    // containers" (pod validation).
    for c in &all {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            if m["mountPropagation"] == "Bidirectional" {
                assert_eq!(
                    c["securityContext"]["privileged"], true,
                    "container {} mounts {} Bidirectional without privileged",
                    c["name"], m["mountPath"]
                );
            }
        }
    }
    let agent = agent_container(&ds)?;
    assert_ne!(agent["securityContext"]["privileged"], true);
    // Exactly what the scenarios prove the agent needs (tests/tests/
    // privilege.rs runs every mode with this set): nothing of the
    // runtime's default set, no SYS_ADMIN.
    let caps = proxy_tests::privilege::agent_capabilities()?;
    let want: std::collections::BTreeSet<String> =
        ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_RESOURCE"]
            .map(str::to_owned)
            .into();
    assert_eq!(caps, want);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], AGENT_NAME);
    assert!(
        pod["tolerations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "no toleration of every taint"
    );
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 1);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["port"], 10256, "{probe}");
    }
    // Every image the cluster runs from deploy/ is either ours (loaded into
    // kind) or pinned to a tag.
    for (f, doc) in MANIFEST_DIRS
        .iter()
        .map(|d| manifests_in(&deploy_dir().join(d)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
    {
        let text = serde_json::to_string(&doc)?;
        for image in text.split("\"image\":\"").skip(1) {
            let image = image.split('"').next().unwrap_or_default();
            assert!(
                image == AGENT_IMAGE
                    || image == TOOLS_IMAGE
                    || image.rsplit_once(':').is_some_and(|(_, t)| t != "latest"),
                "{}: image {image} is not pinned",
                f.display()
            );
        }
    }
    Ok(())
}

const AGENT_IMAGE: &str = "kube-proxy-ebpf:dev";
const TOOLS_IMAGE: &str = "kube-proxy-ebpf-tools:dev";

/// The agent's image carries what the agent runs and nothing else: the
/// smoke and benchmark tools live in their own image, built from the
/// Dockerfile's `tools` stage, and only those pods use it.
#[test]
fn the_agent_image_carries_no_benchmark_tools() -> Result<()> {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile"))?;
    // Stage name -> its instructions (comments left out).
    let mut stages: BTreeMap<String, String> = BTreeMap::new();
    let mut current = None;
    for line in dockerfile.lines() {
        if let Some(rest) = line.strip_prefix("FROM ") {
            let name = rest
                .split_once(" AS ")
                .map(|(_, n)| n.trim().to_owned())
                .context("every stage is named (FROM ... AS name)")?;
            current = Some(name.clone());
            stages.insert(name, String::new());
        } else if let Some(name) = &current
            && !line.trim_start().starts_with('#')
            && let Some(text) = stages.get_mut(name)
        {
            text.push_str(line);
            text.push('\n');
        }
    }
    let runtime = stages.get("runtime").context("no runtime stage")?;
    let tools = stages.get("tools").context("no tools stage")?;
    for tool in ["curl", "iperf3"] {
        assert!(!runtime.contains(tool), "runtime stage installs {tool}");
        assert!(tools.contains(tool), "tools stage lacks {tool}");
    }
    for tool in ["iptables", "nftables", "ipvsadm", "conntrack"] {
        assert!(runtime.contains(tool), "runtime stage lacks {tool}");
    }
    assert!(dockerfile.contains("FROM runtime AS tools"));
    let ds = daemonset()?;
    let pod = &ds["spec"]["template"]["spec"];
    for c in ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
    {
        assert_eq!(c["image"], AGENT_IMAGE, "DaemonSet container {}", c["name"]);
    }
    for d in ["smoke", "bench"] {
        for (f, doc) in manifests_in(&deploy_dir().join(d))? {
            let text = serde_json::to_string(&doc)?;
            assert!(
                !text.contains(&format!("\"image\":\"{AGENT_IMAGE}\"")),
                "{}: a test pod runs the agent's image",
                f.display()
            );
        }
    }
    Ok(())
}
