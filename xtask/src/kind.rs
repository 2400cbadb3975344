//! `cargo xtask kind`: a kind cluster without kube-proxy, running
//! kube-proxy-ebpf from deploy/, checked end to end.
//!
//! Steps: check that docker, kind and kubectl are on PATH and the Docker
//! daemon answers; create the cluster from deploy/kind-config.yaml (or reuse
//! it); build deploy/Dockerfile; `kind load docker-image`; apply
//! deploy/manifests/; wait for the DaemonSet; deploy deploy/smoke/ and curl
//! the echo Service by name (cluster DNS + ClusterIP) from a pod and its
//! NodePort from this host through a node's address; print how to run the
//! iperf3 benchmark.

use std::{
    env,
    ffi::OsStr,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::run;

/// The cluster name: its control-plane container is `kind-control-plane`,
/// the API server address the DaemonSet uses.
pub const CLUSTER: &str = "kind";
/// kubectl context kind writes for [`CLUSTER`].
const CONTEXT: &str = "kind-kind";
/// The image the manifests run (never pulled: loaded into the nodes).
pub const IMAGE: &str = "kube-proxy-ebpf:dev";
/// The smoke check's and benchmark pods' image (curl, iperf3).
pub const TOOLS_IMAGE: &str = "kube-proxy-ebpf-tools:dev";
/// NodePort of deploy/smoke/smoke.yaml's echo-nodeport Service.
const SMOKE_NODEPORT: u16 = 30080;

/// The external tools, resolved to paths.
#[derive(Debug)]
pub struct Tools {
    pub docker: PathBuf,
    pub kind: PathBuf,
    pub kubectl: PathBuf,
}

/// An executable named `name` in the directories of `path` (a PATH value).
fn which(name: &str, path: &OsStr) -> Option<PathBuf> {
    env::split_paths(path).map(|d| d.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Find docker, kind and kubectl on `path` and check that the Docker daemon
/// answers; the error is one sentence naming what is missing.
pub fn preflight(path: &OsStr) -> Result<Tools> {
    let found: Vec<(&str, Option<PathBuf>)> = ["docker", "kind", "kubectl"]
        .into_iter()
        .map(|n| (n, which(n, path)))
        .collect();
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        bail!(
            "`cargo xtask kind` needs docker, kind and kubectl on PATH, and {} not found: install {} and retry.",
            if missing.len() == 1 {
                "this one is"
            } else {
                "these are"
            },
            missing.join(", ")
        );
    }
    let mut paths = found.into_iter().filter_map(|(_, p)| p);
    let (Some(docker), Some(kind), Some(kubectl)) = (paths.next(), paths.next(), paths.next())
    else {
        bail!("tool lookup lost a path");
    };
    let info = Command::new(&docker)
        .args(["info", "--format", "{{.ServerVersion}}"])
        .env("PATH", path)
        .output()
        .with_context(|| format!("running {} info", docker.display()))?;
    if !info.status.success() {
        bail!(
            "the Docker daemon does not answer (`docker info` failed: {}): start Docker and retry.",
            String::from_utf8_lossy(&info.stderr).trim()
        );
    }
    Ok(Tools {
        docker,
        kind,
        kubectl,
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Tools {
    fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.args(["--context", CONTEXT]);
        c
    }

    fn output(cmd: &mut Command) -> Result<String> {
        let out = cmd
            .output()
            .with_context(|| format!("failed to start {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Retry `f` every 2 s until it succeeds or `within` passes.
fn retry<T>(what: &str, within: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: no success within {within:?}")));
            }
            Err(e) => {
                eprintln!("kind: {what}: {e:#}; retrying");
                thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

/// HTTP/1.0 GET from this host (no curl needed), returning the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "GET http://{addr}{path}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.trim().to_owned())
}

pub fn kind() -> Result<()> {
    let path = env::var_os("PATH").unwrap_or_default();
    let t = preflight(&path)?;
    let root = workspace_root();
    let deploy = root.join("deploy");

    // 1. Cluster (reused if it exists, so a second run only redeploys).
    let clusters = Tools::output(Command::new(&t.kind).args(["get", "clusters"]))?;
    let reused = clusters.lines().any(|l| l.trim() == CLUSTER);
    if reused {
        eprintln!("kind: reusing cluster {CLUSTER:?}");
    } else {
        run(Command::new(&t.kind)
            .args(["create", "cluster", "--name", CLUSTER, "--config"])
            .arg(deploy.join("kind-config.yaml")))?;
    }

    // 2. Images, built from the repository root and loaded into every
    // node: the agent's, and the tools image the smoke and benchmark pods
    // run (the agent's image carries no curl or iperf3).
    for (target, image) in [("runtime", IMAGE), ("tools", TOOLS_IMAGE)] {
        run(Command::new(&t.docker)
            .args(["build", "-f"])
            .arg(deploy.join("Dockerfile"))
            .args(["--target", target, "-t", image])
            .arg(&root))?;
        run(Command::new(&t.kind).args(["load", "docker-image", image, "--name", CLUSTER]))?;
    }

    // 3. The agent.
    run(t
        .kubectl()
        .arg("apply")
        .arg("-f")
        .arg(deploy.join("manifests")))?;
    if reused {
        // Same tag, new image: replace the pods (pinned maps keep flows).
        run(t.kubectl().args([
            "-n",
            "kube-system",
            "rollout",
            "restart",
            "daemonset/kube-proxy-ebpf",
        ]))?;
    }
    run(t.kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/kube-proxy-ebpf",
        "--timeout=300s",
    ]))?;

    // 4. Smoke check: CoreDNS only becomes ready once its ClusterIP works.
    run(t.kubectl().args([
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/coredns",
        "--timeout=180s",
    ]))?;
    run(t.kubectl().arg("apply").arg("-f").arg(deploy.join("smoke")))?;
    run(t.kubectl().args([
        "-n",
        "kpe-smoke",
        "rollout",
        "status",
        "deployment/echo",
        "--timeout=180s",
    ]))?;
    run(t.kubectl().args([
        "-n",
        "kpe-smoke",
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=120s",
    ]))?;
    let from_pod = retry(
        "curl the echo ClusterIP from a pod",
        Duration::from_secs(60),
        || {
            Tools::output(t.kubectl().args([
                "-n",
                "kpe-smoke",
                "exec",
                "client",
                "--",
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "5",
                "http://echo.kpe-smoke.svc.cluster.local:8080/hostname",
            ]))
        },
    )?;
    eprintln!("kind: pod -> echo ClusterIP (by DNS name): answered by {from_pod}");
    let node_ip = Tools::output(t.kubectl().args([
        "get",
        "node",
        &format!("{CLUSTER}-worker"),
        "-o",
        "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
    ]))?;
    let ip = node_ip
        .parse::<std::net::IpAddr>()
        .with_context(|| format!("node {CLUSTER}-worker InternalIP {node_ip:?}"))?;
    let addr = SocketAddr::new(ip, SMOKE_NODEPORT);
    let from_host = retry(
        &format!("GET the echo NodePort at {addr} from this host"),
        Duration::from_secs(60),
        || {
            http_get(addr, "/hostname").context(
                "(on Docker Desktop for macOS/Windows the node addresses are not routed to the host; \
                 run the check from a node: docker exec kind-control-plane curl -sS http://ADDR:30080/hostname)",
            )
        },
    )?;
    eprintln!("kind: host -> {addr} (NodePort): answered by {from_host}");
    eprintln!("kind: smoke check passed");

    println!(
        "\nkube-proxy-ebpf runs on kind cluster {CLUSTER:?} (kubectl --context {CONTEXT}).\n\
         iperf3 through a ClusterIP, client and server on different nodes:\n\
         \x20 kubectl apply -f deploy/bench/iperf3-server.yaml\n\
         \x20 kubectl -n kpe-bench rollout status deployment/iperf3-server\n\
         \x20 kubectl apply -f deploy/bench/iperf3-client.yaml\n\
         \x20 kubectl -n kpe-bench wait --for=jsonpath='{{.status.phase}}'=Succeeded pod/iperf3-client --timeout=120s\n\
         \x20 kubectl -n kpe-bench logs iperf3-client\n\
         Switch the dataplane (one ConfigMap field), then rerun the client:\n\
         \x20 kubectl -n kube-system patch configmap kube-proxy-ebpf --type merge -p '{{\"data\":{{\"mode\":\"ebpf\"}}}}'\n\
         \x20 kubectl -n kube-system rollout restart daemonset/kube-proxy-ebpf\n\
         \x20 kubectl -n kpe-bench delete pod iperf3-client && kubectl apply -f deploy/bench/iperf3-client.yaml\n\
         Delete the cluster: kind delete cluster --name {CLUSTER}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> TempDir {
            let p = env::temp_dir().join(format!("xtask-kind-{}-{label}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).expect("temp dir");
            TempDir(p)
        }

        /// An executable shell script `name` that exits with `code`.
        fn tool(&self, name: &str, code: i32) {
            let p = self.0.join(name);
            fs::write(
                &p,
                format!("#!/bin/sh\necho \"{name} stub: $*\" >&2\nexit {code}\n"),
            )
            .expect("write stub");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn err(path: &Path) -> String {
        match preflight(path.as_os_str()) {
            Ok(t) => panic!("preflight passed with {t:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn without_docker_kind_and_kubectl_it_names_all_three() {
        let d = TempDir::new("none");
        let e = err(&d.0);
        assert!(e.contains("install docker, kind, kubectl and retry"), "{e}");
        assert_eq!(e.lines().count(), 1, "one sentence: {e}");
    }

    #[test]
    fn names_only_what_is_missing() {
        let d = TempDir::new("nokind");
        d.tool("docker", 0);
        d.tool("kubectl", 0);
        let e = err(&d.0);
        assert!(
            e.contains("this one is not found: install kind and retry"),
            "{e}"
        );
        // Not executable does not count.
        let p = d.0.join("kind");
        fs::write(&p, "#!/bin/sh\n").expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(err(&d.0).contains("install kind and retry"));
    }

    #[test]
    fn a_silent_docker_daemon_is_named() {
        let d = TempDir::new("nodaemon");
        d.tool("docker", 1);
        d.tool("kind", 0);
        d.tool("kubectl", 0);
        let e = err(&d.0);
        assert!(e.starts_with("the Docker daemon does not answer"), "{e}");
        assert!(e.contains("docker stub: info"), "{e}");
    }

    #[test]
    fn all_present_and_answering_passes() {
        let d = TempDir::new("ok");
        for t in ["docker", "kind", "kubectl"] {
            d.tool(t, 0);
        }
        let t = preflight(d.0.as_os_str()).expect("preflight");
        assert_eq!(t.kind, d.0.join("kind"));
    }
}
