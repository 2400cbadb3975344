//! Scenario tests made readable: a [`Scenario`] is a netns [`Cluster`], the
//! API server fixture with the Node objects, backend servers in chosen pods,
//! one test [`Cgroup`] per node and the real agent on every node (socket LB
//! on or off, hooks attached to that node's cgroup).
//!
//! Clients are `podclient` *processes*, started inside a pod's network
//! namespace after they moved themselves into their node's cgroup, so cgroup
//! socket hooks see them (cgroup v2 moves whole processes; a thread of the
//! test process cannot join a cgroup alone). With socket LB off the same
//! clients exercise the per-packet tc path.
//!
//! Objects are built with [`Service`] and [`EndpointSlice`] and applied with
//! [`Scenario::apply`] (create or replace).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::agent::{Agent, AgentOptions, bin_dir};
use crate::apiserver::ApiServer;
use crate::cgroup::Cgroup;
use crate::cluster::{Cluster, ClusterSpec, Pod, TcpMode, TcpServer, UdpServer, parse_reply};

/// The Node label naming its zone (topology-aware routing).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

// ---------------------------------------------------------------------------
// podclient wire format
// ---------------------------------------------------------------------------

/// Why a client request failed (the same classes as
/// [`crate::cluster::ClientError`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// ECONNREFUSED: RST to the SYN, ICMP port unreachable.
    Refused,
    /// No answer within the timeout.
    TimedOut,
    /// No route, ICMP host/net unreachable, EPERM/EACCES.
    Unreachable,
    /// Reset after the connection was established.
    Reset,
    /// A UDP reply came from another address than the one asked.
    WrongSource,
    /// Anything else.
    Other,
}

/// One request of a `podclient` run (one JSON line).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientResult {
    pub ok: bool,
    /// The reply line, `"<backend name> <peer ip>:<peer port>"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// TCP: `getpeername()` of the connected socket; UDP: the reply's source.
    /// Must be the address the client asked for (socket LB hides the backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// The client socket's own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub elapsed_ms: f64,
}

impl ClientResult {
    /// Name of the backend that answered.
    pub fn backend(&self) -> Option<&str> {
        parse_reply(self.reply.as_deref()?).map(|(name, _)| name)
    }

    /// The client address the backend saw.
    pub fn seen_client(&self) -> Option<SocketAddr> {
        parse_reply(self.reply.as_deref()?).map(|(_, peer)| peer)
    }

    pub fn elapsed(&self) -> Duration {
        Duration::from_secs_f64(self.elapsed_ms.max(0.0) / 1000.0)
    }

    pub fn is_refused(&self) -> bool {
        self.error == Some(ErrorKind::Refused)
    }
}

impl std::fmt::Display for ClientResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok {
            write!(f, "ok {:?}", self.reply.as_deref().unwrap_or(""))?;
        } else {
            write!(
                f,
                "{:?}: {}",
                self.error.unwrap_or(ErrorKind::Other),
                self.detail.as_deref().unwrap_or("")
            )?;
        }
        if let Some(p) = self.peer {
            write!(f, " peer {p}")?;
        }
        write!(f, " after {:.1} ms", self.elapsed_ms)
    }
}

/// One stream of a `podclient --hold-secs` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamResult {
    pub stream: usize,
    /// Still healthy at the end.
    pub ok: bool,
    /// Bytes written.
    pub sent: u64,
    /// Bytes acknowledged by the peer.
    pub acked: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the stream failed, or when the run ended.
    pub elapsed_ms: f64,
}

// ---------------------------------------------------------------------------
// Running podclient in a pod + cgroup
// ---------------------------------------------------------------------------

/// The `podclient` binary: next to the other workspace binaries
/// ([`bin_dir`]), else next to the running test binary's `deps/` directory.
pub fn podclient_path() -> Result<PathBuf> {
    let mut tried = vec![bin_dir().join("podclient")];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        tried.push(dir.join("podclient"));
        if let Some(up) = dir.parent() {
            tried.push(up.join("podclient"));
        }
    }
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "podclient binary not found (tried {tried:?}): build it with `cargo build -p proxy-tests --bin podclient` \
         (`cargo test -p proxy-tests` builds it before the integration tests)"
    )
}

/// Transport of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `TCP` / `UDP` as in Kubernetes objects.
    pub fn k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What a `podclient` run does.
#[derive(Clone, Debug)]
pub struct Request {
    pub proto: Protocol,
    pub to: SocketAddr,
    pub count: usize,
    pub timeout: Duration,
    pub sport_spread: bool,
}

impl Request {
    /// One TCP request with a 1 s timeout.
    pub fn tcp(to: impl Into<SocketAddr>) -> Request {
        Request {
            proto: Protocol::Tcp,
            to: to.into(),
            count: 1,
            timeout: Duration::from_secs(1),
            sport_spread: false,
        }
    }

    /// One UDP request with a 1 s timeout.
    pub fn udp(to: impl Into<SocketAddr>) -> Request {
        Request {
            proto: Protocol::Udp,
            ..Request::tcp(to)
        }
    }

    pub fn count(mut self, n: usize) -> Request {
        self.count = n;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Request {
        self.timeout = t;
        self
    }

    /// Every request from its own explicit source port.
    pub fn sport_spread(mut self) -> Request {
        self.sport_spread = true;
        self
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--proto".to_owned(),
            self.proto.arg().to_owned(),
            "--to".to_owned(),
            self.to.to_string(),
            "--count".to_owned(),
            self.count.to_string(),
            "--timeout-ms".to_owned(),
            self.timeout.as_millis().max(1).to_string(),
        ];
        if self.sport_spread {
            a.push("--sport-spread".to_owned());
        }
        a
    }

    /// Upper bound of a whole run.
    fn deadline(&self) -> Duration {
        let n = u32::try_from(self.count).unwrap_or(u32::MAX);
        self.timeout.saturating_mul(n) + Duration::from_secs(5)
    }
}

/// A client pod as seen by `podclient`: its namespace and the cgroup its
/// processes join.
#[derive(Clone, Debug)]
pub struct PodClient {
    pub pod_name: String,
    pub ip: Ipv4Addr,
    pub netns_path: PathBuf,
    pub cgroup_path: PathBuf,
}

impl PodClient {
    pub fn new(pod: &Pod, cgroup: &Cgroup) -> PodClient {
        PodClient {
            pod_name: pod.name.clone(),
            ip: pod.ip,
            netns_path: pod.ns.path(),
            cgroup_path: cgroup.path().to_owned(),
        }
    }

    /// Starts `podclient args...` in the pod's namespace, already a member
    /// of the cgroup when it execs (the shell moves itself in, then execs
    /// nsenter, which execs podclient: one pid throughout).
    pub fn spawn(&self, args: &[String]) -> Result<RunningClient> {
        let exe = podclient_path()?;
        let script = r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" -- "$@""#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("podclient-sh")
            .arg(&self.cgroup_path)
            .arg(&self.netns_path)
            .arg(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning podclient")?;
        Ok(RunningClient {
            child: Some(child),
            what: format!("podclient {args:?} in {}", self.pod_name),
        })
    }

    /// Runs `req` and returns one result per request.
    pub fn run(&self, req: &Request) -> Result<Vec<ClientResult>> {
        let results: Vec<ClientResult> = self.spawn(&req.args())?.wait(req.deadline())?;
        if results.len() != req.count {
            bail!(
                "podclient {req:?} from {} printed {} results, expected {}",
                self.pod_name,
                results.len(),
                req.count
            );
        }
        Ok(results)
    }

    /// `n` TCP requests to `to` (1 s timeout each). Panics on harness errors.
    #[track_caller]
    pub fn tcp(&self, to: impl Into<SocketAddr>, n: usize) -> Vec<ClientResult> {
        let req = Request::tcp(to).count(n);
        self.run(&req)
            .unwrap_or_else(|e| panic!("running {req:?}: {e:#}"))
    }

    /// `n` UDP requests to `to` (1 s timeout each). Panics on harness errors.
    #[track_caller]
    pub fn udp(&self, to: impl Into<SocketAddr>, n: usize) -> Vec<ClientResult> {
        let req = Request::udp(to).count(n);
        self.run(&req)
            .unwrap_or_else(|e| panic!("running {req:?}: {e:#}"))
    }

    /// One request of `proto`; panics on harness errors.
    #[track_caller]
    pub fn one(&self, proto: Protocol, to: impl Into<SocketAddr>) -> ClientResult {
        let req = Request {
            proto,
            ..Request::tcp(to)
        };
        self.run(&req)
            .unwrap_or_else(|e| panic!("running {req:?}: {e:#}"))
            .remove(0)
    }

    /// Starts a hold run: `streams` TCP connections to `to`, each sending a
    /// chunk every 50 ms for `secs`; [`RunningClient::wait`] returns one
    /// [`StreamResult`] per stream.
    pub fn spawn_hold(
        &self,
        to: impl Into<SocketAddr>,
        secs: f64,
        streams: usize,
    ) -> Result<RunningClient> {
        self.spawn(&[
            "--proto".to_owned(),
            "tcp".to_owned(),
            "--to".to_owned(),
            to.into().to_string(),
            "--hold-secs".to_owned(),
            secs.to_string(),
            "--streams".to_owned(),
            streams.to_string(),
        ])
    }
}

/// A started `podclient`; killed and reaped on drop.
#[derive(Debug)]
pub struct RunningClient {
    child: Option<Child>,
    what: String,
}

impl RunningClient {
    /// The client's pid.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits (at most `within`) for the client to exit and parses its JSON
    /// lines.
    pub fn wait<T: serde::de::DeserializeOwned>(mut self, within: Duration) -> Result<Vec<T>> {
        let mut child = self.child.take().context("already waited")?;
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let mut stderr = child.stderr.take().context("no stderr pipe")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not finish within {within:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            bail!("{} failed ({status}): {}", self.what, err.trim());
        }
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}: bad output line {l:?}", self.what))
            })
            .collect()
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Scenario
// ---------------------------------------------------------------------------

/// The dataplane the agents run: eBPF with the socket-LB hooks on or off,
/// or one of the kube-proxy fallback modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataplaneMode {
    EbpfSocketLb,
    EbpfTc,
    Iptables,
    Nftables,
}

/// The scenarios' parameter, named for the two eBPF variants it started
/// with (`SocketLb::On` / `SocketLb::Off`).
pub type SocketLb = DataplaneMode;

#[allow(non_upper_case_globals)]
impl DataplaneMode {
    /// eBPF, socket LB on.
    pub const On: DataplaneMode = DataplaneMode::EbpfSocketLb;
    /// eBPF, socket LB off (tc programs only).
    pub const Off: DataplaneMode = DataplaneMode::EbpfTc;

    /// The value of `--socket-lb`.
    pub fn flag(self) -> &'static str {
        match self {
            DataplaneMode::EbpfSocketLb => "true",
            _ => "false",
        }
    }

    /// The value of `--mode`.
    pub fn mode(self) -> &'static str {
        match self {
            DataplaneMode::EbpfSocketLb | DataplaneMode::EbpfTc => "ebpf",
            DataplaneMode::Iptables => "iptables",
            DataplaneMode::Nftables => "nftables",
        }
    }

    pub fn is_ebpf(self) -> bool {
        self.mode() == "ebpf"
    }

    /// The agent's `--mode` and `--socket-lb` arguments for this mode.
    pub fn agent_args(self) -> Vec<String> {
        ["--mode", self.mode(), "--socket-lb", self.flag()]
            .map(str::to_owned)
            .to_vec()
    }
}

#[derive(Clone, Debug)]
struct ServerSpec {
    node: usize,
    pod: usize,
    port: u16,
    name: Option<String>,
    tcp_mode: Option<TcpMode>,
}

/// Builds a [`Scenario`]; see [`Scenario::builder`].
#[derive(Clone, Debug)]
pub struct ScenarioBuilder {
    label: String,
    socket_lb: SocketLb,
    spec: ClusterSpec,
    servers: Vec<ServerSpec>,
    objects: Vec<Value>,
    agent_args: Vec<String>,
    capabilities: Option<BTreeSet<String>>,
    /// Servers listen on `[::]` (both families) instead of `0.0.0.0`.
    dual_stack_servers: bool,
    /// Labels of the Node objects, by node number (1-based).
    node_labels: BTreeMap<usize, BTreeMap<String, String>>,
}

impl ScenarioBuilder {
    /// Every server listens on `[::]:port`, so it answers over IPv6 as well
    /// as IPv4 (an IPv4 client then shows as `::ffff:a.b.c.d` in replies).
    pub fn dual_stack_servers(mut self) -> Self {
        self.dual_stack_servers = true;
        self
    }

    /// A label on node `i`'s Node object (1-based).
    pub fn node_label(mut self, i: usize, key: &str, value: &str) -> Self {
        self.node_labels
            .entry(i)
            .or_default()
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Node `i` in `zone` (its `topology.kubernetes.io/zone` label).
    pub fn node_zone(self, i: usize, zone: &str) -> Self {
        self.node_label(i, LABEL_ZONE, zone)
    }

    /// The cluster to build (default: 2 nodes x 2 pods, external client).
    pub fn cluster(mut self, spec: ClusterSpec) -> Self {
        self.spec = spec;
        self
    }

    /// A TCP reply server on `port` of pod (node, j), named after the pod.
    pub fn tcp_server(self, (node, pod): (usize, usize), port: u16) -> Self {
        self.server(node, pod, port, None, Some(TcpMode::Reply))
    }

    /// A TCP reply server whose replies carry `name` instead of the pod name.
    pub fn tcp_server_named(self, (node, pod): (usize, usize), port: u16, name: &str) -> Self {
        self.server(node, pod, port, Some(name.to_owned()), Some(TcpMode::Reply))
    }

    /// A TCP sink server (for hold runs).
    pub fn tcp_sink(self, (node, pod): (usize, usize), port: u16) -> Self {
        self.server(node, pod, port, None, Some(TcpMode::Sink))
    }

    /// A UDP reply server on `port` of pod (node, j), named after the pod.
    pub fn udp_server(self, (node, pod): (usize, usize), port: u16) -> Self {
        self.server(node, pod, port, None, None)
    }

    /// A UDP reply server whose replies carry `name`.
    pub fn udp_server_named(self, (node, pod): (usize, usize), port: u16, name: &str) -> Self {
        self.server(node, pod, port, Some(name.to_owned()), None)
    }

    fn server(
        mut self,
        node: usize,
        pod: usize,
        port: u16,
        name: Option<String>,
        tcp_mode: Option<TcpMode>,
    ) -> Self {
        self.servers.push(ServerSpec {
            node,
            pod,
            port,
            name,
            tcp_mode,
        });
        self
    }

    /// An object present before the agents start.
    pub fn object(mut self, obj: &impl KubeObject) -> Self {
        self.objects.push(obj.to_json());
        self
    }

    /// Extra agent arguments (every node).
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Run every agent with exactly these capabilities (see
    /// [`AgentOptions::capabilities`]).
    pub fn capabilities(mut self, caps: BTreeSet<String>) -> Self {
        self.capabilities = Some(caps);
        self
    }

    pub fn build(self) -> Result<Scenario> {
        let cluster = Cluster::new(self.spec).context("building the cluster")?;
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for s in &self.servers {
            let pod = cluster.pod(s.node, s.pod);
            let name = s.name.clone().unwrap_or_else(|| pod.name.clone());
            let any: IpAddr = if self.dual_stack_servers {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            let bind = SocketAddr::new(any, s.port);
            match s.tcp_mode {
                Some(mode) => tcp.push(TcpServer::start_mode(&pod.ns, &name, bind, mode)?),
                None => udp.push(UdpServer::start(&pod.ns, &name, bind)?),
            }
        }
        let api = ApiServer::start()?;
        for (i, node) in cluster.nodes().iter().enumerate() {
            let labels = self.node_labels.get(&(i + 1)).cloned().unwrap_or_default();
            let mut addresses =
                vec![json!({"type": "InternalIP", "address": node.underlay_ip.to_string()})];
            if self.dual_stack_servers {
                // A dual-stack node: NodePorts on its IPv6 address too.
                addresses
                    .push(json!({"type": "InternalIP", "address": node.underlay_ip6.to_string()}));
            }
            addresses.push(json!({"type": "Hostname", "address": node.name}));
            api.create(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": labels},
                "status": {"addresses": addresses},
            }))?;
        }
        for obj in &self.objects {
            api.apply_yaml(&serde_json::to_string(obj)?)?;
        }
        let cgroups = cluster
            .nodes()
            .iter()
            .map(|n| Cgroup::new(&format!("{}-{}", self.label, n.name)))
            .collect::<Result<Vec<_>>>()?;
        // Agents start in parallel (each waits for its caches).
        let agents = std::thread::scope(|s| {
            let jobs: Vec<_> = cluster
                .nodes()
                .iter()
                .zip(&cgroups)
                .map(|(node, cg)| {
                    let mut args = self.socket_lb.agent_args();
                    args.extend(["--cgroup-path".to_owned(), cg.path().display().to_string()]);
                    args.extend(self.agent_args.iter().cloned());
                    let api = &api;
                    let capabilities = self.capabilities.clone();
                    s.spawn(move || {
                        Agent::start(
                            node,
                            api,
                            AgentOptions {
                                args,
                                capabilities,
                                ..Default::default()
                            },
                        )
                        .with_context(|| format!("starting the agent on {}", node.name))
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| match j.join() {
                    Ok(r) => r,
                    Err(p) => std::panic::resume_unwind(p),
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Scenario {
            tcp_servers: tcp,
            udp_servers: udp,
            agents,
            cgroups,
            api,
            cluster,
            socket_lb: self.socket_lb,
        })
    }
}

/// A running scenario. Dropping it stops servers, agents (which detach
/// their programs), kills leftover clients, removes the cgroups and deletes
/// every namespace.
pub struct Scenario {
    // Field order is drop order.
    tcp_servers: Vec<TcpServer>,
    udp_servers: Vec<UdpServer>,
    agents: Vec<Agent>,
    cgroups: Vec<Cgroup>,
    pub api: ApiServer,
    pub cluster: Cluster,
    pub socket_lb: SocketLb,
}

impl Scenario {
    /// A builder; `label` names the cgroups (for humans).
    pub fn builder(label: &str, socket_lb: SocketLb) -> ScenarioBuilder {
        ScenarioBuilder {
            label: label.to_owned(),
            socket_lb,
            spec: ClusterSpec::default(),
            servers: Vec::new(),
            objects: Vec::new(),
            agent_args: Vec::new(),
            capabilities: None,
            dual_stack_servers: false,
            node_labels: BTreeMap::new(),
        }
    }

    /// Pod `j` of node `i`.
    pub fn pod(&self, i: usize, j: usize) -> &Pod {
        self.cluster.pod(i, j)
    }

    /// The test cgroup of node `i` (1-based).
    pub fn cgroup(&self, i: usize) -> &Cgroup {
        i.checked_sub(1)
            .and_then(|k| self.cgroups.get(k))
            .unwrap_or_else(|| panic!("no cgroup for node {i}"))
    }

    /// The agent of node `i` (1-based).
    pub fn agent(&self, i: usize) -> &Agent {
        i.checked_sub(1)
            .and_then(|k| self.agents.get(k))
            .unwrap_or_else(|| panic!("no agent on node {i}"))
    }

    /// The agent of node `i`, mutably (to stop it, wait for its log).
    pub fn agent_mut(&mut self, i: usize) -> &mut Agent {
        i.checked_sub(1)
            .and_then(|k| self.agents.get_mut(k))
            .unwrap_or_else(|| panic!("no agent on node {i}"))
    }

    /// A client in pod (i, j), in node i's cgroup.
    pub fn client(&self, i: usize, j: usize) -> PodClient {
        PodClient::new(self.pod(i, j), self.cgroup(i))
    }

    /// The TCP server named `name`.
    pub fn tcp_server(&self, name: &str) -> &TcpServer {
        self.tcp_servers
            .iter()
            .find(|s| s.name() == name)
            .unwrap_or_else(|| panic!("no TCP server {name}"))
    }

    /// The UDP server named `name`.
    pub fn udp_server(&self, name: &str) -> &UdpServer {
        self.udp_servers
            .iter()
            .find(|s| s.name() == name)
            .unwrap_or_else(|| panic!("no UDP server {name}"))
    }

    /// Create or replace an object.
    pub fn apply(&self, obj: &impl KubeObject) {
        let v = obj.to_json();
        self.api
            .apply_yaml(&serde_json::to_string(&v).unwrap_or_default())
            .unwrap_or_else(|e| panic!("applying {v}: {e:#}"));
    }

    /// Set (`Some`) or remove (`None`) a label of node `i`'s Node object.
    pub fn set_node_label(&self, i: usize, key: &str, value: Option<&str>) {
        let name = self.cluster.node(i).name.clone();
        self.api
            .modify("Node", None, &name, |o| {
                let labels = &mut o["metadata"]["labels"];
                if !labels.is_object() {
                    *labels = json!({});
                }
                if let Some(l) = labels.as_object_mut() {
                    match value {
                        Some(v) => l.insert(key.to_owned(), json!(v)),
                        None => l.remove(key),
                    };
                }
            })
            .unwrap_or_else(|e| panic!("labelling Node {name}: {e:#}"));
    }

    /// Delete an object (`kind` as in the API, namespace `default`).
    pub fn delete(&self, kind: &str, name: &str) {
        let ns = (kind != "Node").then_some("default");
        self.api
            .delete(kind, ns, name)
            .unwrap_or_else(|e| panic!("deleting {kind} {name}: {e:#}"));
    }

    /// Frontends node `i`'s agent programmed, as `ip:port/PROTO`, sorted,
    /// read from the kernel state of the scenario's mode: a frontend is
    /// programmed when traffic to it is ours to handle, dispatched to
    /// backends or (no endpoints) rejected. eBPF: the services map
    /// (`proxyctl dump-maps`); iptables: [`iptables_frontends`] of
    /// `iptables-save`; nftables: [`nft_frontends`] of our table.
    pub fn frontends(&self, i: usize) -> Vec<String> {
        mode_frontends(self.socket_lb, self.agent(i), &self.cluster.node(i).ns)
            .unwrap_or_else(|e| panic!("{:?} frontends on node {i}: {e:#}", self.socket_lb))
    }

    /// Whether anything node `i`'s agent programmed refers to `ip` as a
    /// service address: in the fallback modes any of our rules, chains or
    /// map elements (the whole `iptables-save` of the nat and filter tables
    /// / our nftables table, as text); in eBPF the services map (the other
    /// maps are keyed by service id, and conntrack outlives services).
    /// An ignored service (headless, ExternalName, another proxy's) must
    /// not be mentioned at all.
    pub fn programmed_mentions(&self, i: usize, ip: Ipv4Addr) -> bool {
        let ns = &self.cluster.node(i).ns;
        let text = match self.socket_lb {
            DataplaneMode::EbpfSocketLb | DataplaneMode::EbpfTc => {
                frontends(self.agent(i)).map(|f| f.join("\n"))
            }
            DataplaneMode::Iptables => ["nat", "filter"]
                .iter()
                .map(|t| ns.exec(&["iptables-save", "-t", t]))
                .collect::<Result<Vec<_>>>()
                .map(|v| v.concat()),
            DataplaneMode::Nftables => {
                ns.exec(&["nft", "list", "table", "ip", NFT_TABLE])
                    .or_else(|e| {
                        if format!("{e:#}").contains("No such file or directory") {
                            Ok(String::new())
                        } else {
                            Err(e)
                        }
                    })
            }
        }
        .unwrap_or_else(|e| panic!("{:?} state on node {i}: {e:#}", self.socket_lb));
        mentions_ip(&text, ip)
    }

    /// Packets node `i` dropped because their source was not in a
    /// service's `loadBalancerSourceRanges`, from the mode's kernel state:
    /// eBPF: the `drop_source_range` counter; iptables: our filter
    /// `KUBE-FIREWALL` DROP rule's packet counter; nftables: the `counter
    /// drop` of our `fw-*` chains.
    pub fn source_range_drops(&self, i: usize) -> u64 {
        let ns = &self.cluster.node(i).ns;
        match self.socket_lb {
            DataplaneMode::EbpfSocketLb | DataplaneMode::EbpfTc => {
                stats(self.agent(i)).map(|m| m.get("drop_source_range").copied().unwrap_or(0))
            }
            DataplaneMode::Iptables => ns
                .exec(&["iptables-save", "-c", "-t", "filter"])
                .map(|s| iptables_source_range_drops(&s)),
            DataplaneMode::Nftables => ns
                .exec(&["nft", "list", "table", "ip", NFT_TABLE])
                .map(|s| nft_source_range_drops(&s)),
        }
        .unwrap_or_else(|e| panic!("{:?} source-range drops on node {i}: {e:#}", self.socket_lb))
    }
}

impl Scenario {
    /// Node `i`'s datapath counters (`proxyctl dump-maps` `stats`, by name;
    /// eBPF only).
    pub fn stats(&self, i: usize) -> BTreeMap<String, u64> {
        stats(self.agent(i)).unwrap_or_else(|e| panic!("dump-maps on node {i}: {e:#}"))
    }

    /// Sums of the socket-path and tc-path translation counters over all
    /// nodes.
    fn path_counters(&self) -> (u64, u64, Vec<BTreeMap<String, u64>>) {
        let per_node: Vec<BTreeMap<String, u64>> =
            (1..=self.agents.len()).map(|i| self.stats(i)).collect();
        let sum = |names: &[&str]| -> u64 {
            per_node
                .iter()
                .flat_map(|m| names.iter().filter_map(|n| m.get(*n)))
                .sum()
        };
        let socket = sum(&["sock_xlate", "sock_refused"]);
        let tc = sum(&["dnat", "reject_tcp_rst", "reject_icmp"]);
        (socket, tc, per_node)
    }

    /// Asserts the traffic so far used the path this scenario is about:
    /// with socket LB on the socket hooks translated (`sock_xlate` /
    /// `sock_refused` > 0); with it off they never ran and the tc programs
    /// translated or rejected. (With socket LB on, tc may still translate
    /// a flow whose connect() came before its service was programmed; see
    /// [`Scenario::assert_path`] for a strict check.)
    pub fn assert_datapath(&self) {
        if !self.socket_lb.is_ebpf() {
            let per_node = self.fallback_counters();
            assert!(
                per_node.iter().sum::<u64>() > 0,
                "{:?}: our rules' packet counters are all zero: {per_node:?}",
                self.socket_lb
            );
            for a in &self.agents {
                let pinned = std::fs::read_dir(&a.bpffs_path)
                    .map(|d| d.count())
                    .unwrap_or(0);
                assert_eq!(pinned, 0, "{:?} mode pinned eBPF objects", self.socket_lb);
            }
            return;
        }
        let (socket, tc, per_node) = self.path_counters();
        match self.socket_lb {
            SocketLb::On => {
                assert!(
                    socket > 0,
                    "socket LB on but no socket translation: {per_node:?}"
                );
            }
            _ => {
                assert_eq!(socket, 0, "socket LB off, yet hooks ran: {per_node:?}");
                assert!(
                    tc > 0,
                    "socket LB off but the tc path did nothing: {per_node:?}"
                );
            }
        }
    }

    /// Runs `req` from `c` (a service that is programmed and stable) and
    /// asserts which path handled every request: with socket LB on, the
    /// socket hooks (their counters grow by at least one per request) and
    /// not the tc programs (`dnat`, `reject_*` unchanged); with it off, the
    /// reverse. Returns the results, which the caller still has to check.
    #[track_caller]
    pub fn assert_path(&self, c: &PodClient, req: &Request) -> Vec<ClientResult> {
        if !self.socket_lb.is_ebpf() {
            let before: u64 = self.fallback_counters().iter().sum();
            let rs = c
                .run(req)
                .unwrap_or_else(|e| panic!("running {req:?}: {e:#}"));
            let after = self.fallback_counters();
            let n = u64::try_from(req.count).unwrap_or(u64::MAX);
            let d = after.iter().sum::<u64>().saturating_sub(before);
            // NAT rules see only the first packet of a conntrack flow: a UDP
            // request whose fresh socket got a source port an earlier
            // request used (its entry still tracked, 30-120 s) skips them.
            // TCP re-opens a TIME_WAIT entry, so every connection counts.
            let want = match req.proto {
                Protocol::Udp => n.div_ceil(2),
                Protocol::Tcp => n,
            };
            assert!(
                d >= want,
                "{req:?} in {:?} mode: our rules counted +{d} packets: {after:?}",
                self.socket_lb
            );
            return rs;
        }
        let (socket0, tc0, _) = self.path_counters();
        let rs = c
            .run(req)
            .unwrap_or_else(|e| panic!("running {req:?}: {e:#}"));
        let (socket1, tc1, per_node) = self.path_counters();
        let n = u64::try_from(req.count).unwrap_or(u64::MAX);
        let (ds, dt) = (socket1.saturating_sub(socket0), tc1.saturating_sub(tc0));
        match self.socket_lb {
            SocketLb::On => assert!(
                ds >= n && dt == 0,
                "{req:?} with socket LB on: socket counters +{ds}, tc counters +{dt}: {per_node:?}"
            ),
            _ => assert!(
                ds == 0 && dt >= n,
                "{req:?} with socket LB off: socket counters +{ds}, tc counters +{dt}: {per_node:?}"
            ),
        }
        rs
    }
}

impl Scenario {
    /// Per node, the packets the fallback mode's rules translated or
    /// rejected: in iptables mode the counters of our DNAT (`KUBE-SEP-*`)
    /// and REJECT rules (`iptables-save -c`), in nftables mode the
    /// `counter`s of our table (DNAT, reject, source-range drop).
    pub fn fallback_counters(&self) -> Vec<u64> {
        (1..=self.agents.len())
            .map(|i| {
                fallback_counter(self.socket_lb, &self.cluster.node(i).ns)
                    .unwrap_or_else(|e| panic!("rule counters on node {i}: {e:#}"))
            })
            .collect()
    }
}

/// [`Scenario::fallback_counters`] for one node namespace (0 for eBPF):
/// both families' rules.
pub fn fallback_counter(mode: DataplaneMode, ns: &crate::netns::Netns) -> Result<u64> {
    Ok(fallback_counter_of(mode, ns, false)? + fallback_counter_of(mode, ns, true)?)
}

/// [`fallback_counter`] of one family's rules: IPv4 (iptables, table `ip`)
/// or, with `ipv6`, IPv6 (ip6tables, table `ip6`).
pub fn fallback_counter_of(
    mode: DataplaneMode,
    ns: &crate::netns::Netns,
    ipv6: bool,
) -> Result<u64> {
    let save = if ipv6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    };
    Ok(match mode {
        DataplaneMode::Iptables => iptables_counter(&ns.exec(&[save, "-c"])?),
        DataplaneMode::Nftables => nft_counter(&nft_table_text(ns, ipv6)?),
        _ => 0,
    })
}

/// `nft list table ip[6] kube-proxy-rs` in `ns`; a missing table reads
/// as empty.
pub fn nft_table_text(ns: &crate::netns::Netns, ipv6: bool) -> Result<String> {
    let family = if ipv6 { "ip6" } else { "ip" };
    match ns.exec(&["nft", "list", "table", family, NFT_TABLE]) {
        Ok(t) => Ok(t),
        Err(e) if format!("{e:#}").contains("No such file or directory") => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Packets of our DNAT, REDIRECT and REJECT rules and of the jump to
/// `KUBE-NODEPORTS` (which outlives a deleted service) in `iptables-save
/// -c` output (`[packets:bytes] -A KUBE-... -j ...`).
pub fn iptables_counter(save: &str) -> u64 {
    save.lines()
        .filter(|l| {
            l.contains("] -A KUBE-")
                && ["-j DNAT", "-j REJECT", "-j REDIRECT", "-j KUBE-NODEPORTS"]
                    .iter()
                    .any(|t| l.contains(t))
        })
        .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
        .sum()
}

/// Sum of `counter packets N` in `nft list` output.
pub fn nft_counter(list: &str) -> u64 {
    list.split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Frontends `agent` (running in `mode` in node namespace `ns`) programmed
/// in the kernel, as `ip:port/PROTO`, sorted; see [`Scenario::frontends`].
pub fn mode_frontends(
    mode: DataplaneMode,
    agent: &Agent,
    ns: &crate::netns::Netns,
) -> Result<Vec<String>> {
    match mode {
        DataplaneMode::EbpfSocketLb | DataplaneMode::EbpfTc => frontends(agent),
        DataplaneMode::Iptables => {
            let mut out = iptables_frontends(&ns.exec(&["iptables-save"])?);
            out.extend(iptables_frontends(&ns.exec(&["ip6tables-save"])?));
            out.sort();
            Ok(out)
        }
        DataplaneMode::Nftables => {
            let mut out = nft_frontends(&nft_table_json(ns)?)?;
            out.extend(nft_frontends(&nft_table_json_of(ns, "ip6")?)?);
            out.sort();
            Ok(out)
        }
    }
}

/// The nftables mode's table (proxy's `nftables_rules::TABLE`).
pub const NFT_TABLE: &str = "kube-proxy-rs";

/// `nft -j list table ip kube-proxy-rs` in `ns`; a missing table (nothing
/// programmed yet, or cleaned up) reads as an empty ruleset.
pub fn nft_table_json(ns: &crate::netns::Netns) -> Result<Value> {
    nft_table_json_of(ns, "ip")
}

/// [`nft_table_json`] of our table in `family` (`ip`, `ip6`).
pub fn nft_table_json_of(ns: &crate::netns::Netns, family: &str) -> Result<Value> {
    match ns.exec(&["nft", "-j", "list", "table", family, NFT_TABLE]) {
        Ok(out) => serde_json::from_str(&out).context("parsing nft -j output"),
        Err(e) if format!("{e:#}").contains("No such file or directory") => {
            Ok(json!({"nftables": []}))
        }
        Err(e) => Err(e),
    }
}

/// The value following `flag` among `tokens`.
fn after<'a>(tokens: &[&'a str], flag: &str) -> Option<&'a str> {
    tokens
        .iter()
        .position(|t| *t == flag)
        .and_then(|i| tokens.get(i + 1).copied())
}

/// Frontends our iptables rules handle, as `ip:port/PROTO`, sorted, from
/// `iptables-save` output (nat and filter tables): the `-d IP/32 -p proto
/// --dport N` matches of the nat `KUBE-SERVICES` / `KUBE-NODEPORTS` jumps
/// to a service's `KUBE-SVC-*`, `KUBE-EXT-*` or `KUBE-FW-*` chain
/// (frontends with endpoints), and the `--ctorigdst IP/32 --ctorigdstport
/// N` of the filter `KUBE-SERVICES` / `KUBE-EXTERNAL-SERVICES` REJECT rules
/// (frontends without endpoints). A service we ignore has neither.
pub fn iptables_frontends(save: &str) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut table = "";
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t.trim() == "nat" {
                "nat"
            } else if t.trim() == "filter" {
                "filter"
            } else {
                ""
            };
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"-A"), Some(chain)) = (tokens.first(), tokens.get(1)) else {
            continue;
        };
        let target = after(&tokens, "-j").unwrap_or("");
        let proto = after(&tokens, "-p").unwrap_or("");
        let (addr, port) = match (table, *chain) {
            ("nat", "KUBE-SERVICES" | "KUBE-NODEPORTS")
                if ["KUBE-SVC-", "KUBE-EXT-", "KUBE-FW-"]
                    .iter()
                    .any(|p| target.starts_with(p)) =>
            {
                (after(&tokens, "-d"), after(&tokens, "--dport"))
            }
            ("filter", "KUBE-SERVICES" | "KUBE-EXTERNAL-SERVICES") if target == "REJECT" => (
                after(&tokens, "--ctorigdst"),
                after(&tokens, "--ctorigdstport"),
            ),
            _ => continue,
        };
        if let (Some(addr), Some(port), false) = (addr, port, proto.is_empty()) {
            out.insert(frontend_text(addr, port, proto));
        }
    }
    out.into_iter().collect()
}

/// `ip:port/PROTO` (`[ip6]:port/PROTO`) from an address as the rules
/// print it (with or without `/32`, `/128`).
fn frontend_text(addr: &str, port: &str, proto: &str) -> String {
    let addr = addr
        .strip_suffix("/32")
        .or_else(|| addr.strip_suffix("/128"))
        .unwrap_or(addr);
    let addr = match addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => format!("[{a}]"),
        _ => addr.to_owned(),
    };
    format!("{addr}:{port}/{}", proto.to_uppercase())
}

/// Whether `text` contains `ip` as a whole address (not as the start of
/// a longer one: 10.0.0.1 is not in 10.0.0.12).
pub fn mentions_ip(text: &str, ip: Ipv4Addr) -> bool {
    let needle = ip.to_string();
    text.match_indices(&needle).any(|(at, _)| {
        let mut before = text[..at].chars().rev();
        let mut after = text[at + needle.len()..].chars();
        // Not preceded by a digit or a dot (x.10.96.0.1), not followed by
        // a digit (10.96.0.12) or a dot and a digit (10.96.0.1.5).
        let b = before.next();
        let a = after.next();
        let clean_before = !b.is_some_and(|c| c.is_ascii_digit() || c == '.');
        let clean_after = match a {
            Some(c) if c.is_ascii_digit() => false,
            Some('.') => !after.next().is_some_and(|c| c.is_ascii_digit()),
            _ => true,
        };
        clean_before && clean_after
    })
}

/// A JSON scalar of an nft element key as text (`"tcp"`, `80`).
fn nft_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Frontends our nftables table handles, as `ip:port/PROTO`, sorted, from
/// `nft -j list table ip kube-proxy-rs`: the keys of the `service-ips`
/// (with endpoints), `no-endpoint-services` (rejected) and `firewall-ips`
/// maps, and the `proto . port` keys of `service-nodeports` /
/// `no-endpoint-nodeports` on every address of the `nodeport-ips` set.
pub fn nft_frontends(list: &Value) -> Result<Vec<String>> {
    let objects = list["nftables"]
        .as_array()
        .context("nft -j: no nftables array")?;
    let elems = |kind: &str, name: &str| -> Vec<Value> {
        objects
            .iter()
            .filter_map(|o| o.get(kind))
            .filter(|m| m["name"] == name)
            .filter_map(|m| m["elem"].as_array())
            .flatten()
            .cloned()
            .collect()
    };
    // A map element is `[key, verdict]`; a concatenated key is
    // `{"concat": [...]}`.
    let key_parts = |e: &Value| -> Vec<String> {
        e.get(0)
            .and_then(|k| k["concat"].as_array())
            .map(|parts| parts.iter().map(nft_scalar).collect())
            .unwrap_or_default()
    };
    let mut out = std::collections::BTreeSet::new();
    for map in ["service-ips", "no-endpoint-services", "firewall-ips"] {
        for e in elems("map", map) {
            match key_parts(&e).as_slice() {
                [addr, proto, port] => {
                    out.insert(frontend_text(addr, port, proto));
                }
                other => bail!("nft map {map}: unexpected element key {other:?} in {e}"),
            }
        }
    }
    let node_ips: Vec<String> = elems("set", "nodeport-ips")
        .iter()
        .map(nft_scalar)
        .collect();
    for map in ["service-nodeports", "no-endpoint-nodeports"] {
        for e in elems("map", map) {
            match key_parts(&e).as_slice() {
                [proto, port] => {
                    for addr in &node_ips {
                        out.insert(frontend_text(addr, port, proto));
                    }
                }
                other => bail!("nft map {map}: unexpected element key {other:?} in {e}"),
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Packets counted by the filter `KUBE-FIREWALL` DROP rule (the
/// `loadBalancerSourceRanges` drop) in `iptables-save -c -t filter` output.
pub fn iptables_source_range_drops(save: &str) -> u64 {
    save.lines()
        .filter(|l| l.contains("] -A KUBE-FIREWALL ") && l.contains("-j DROP"))
        .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
        .sum()
}

/// Packets counted in our `fw-*` chains (`counter drop` for sources not in
/// `loadBalancerSourceRanges`) in `nft list table` output.
pub fn nft_source_range_drops(list: &str) -> u64 {
    let mut in_fw = false;
    let mut sum = 0;
    for line in list.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            in_fw = rest.starts_with("fw-");
        } else if in_fw && line.ends_with(" drop") {
            sum += nft_counter(line);
        }
    }
    sum
}

/// An agent's datapath counters by name (`proxyctl dump-maps` `stats`).
pub fn stats(agent: &Agent) -> Result<BTreeMap<String, u64>> {
    let dump: Value = serde_json::from_str(&agent.proxyctl(&["dump-maps", "--output", "json"])?)
        .context("parsing dump-maps JSON")?;
    Ok(dump["stats"]
        .as_array()
        .context("dump-maps: no stats array")?
        .iter()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["value"].as_u64()?)))
        .collect())
}

/// Frontends an agent programmed (`proxyctl dump-maps`), as `ip:port/PROTO`
/// (`[ip6]:port/PROTO` for IPv6).
pub fn frontends(agent: &Agent) -> Result<Vec<String>> {
    let dump: Value = serde_json::from_str(&agent.proxyctl(&["dump-maps", "--output", "json"])?)
        .context("parsing dump-maps JSON")?;
    let mut out: Vec<String> = dump["services"]
        .as_array()
        .context("dump-maps: no services array")?
        .iter()
        .map(|s| {
            let ip = s["frontend"]["ip"].as_str().unwrap_or("");
            // IPv6 in brackets, as the agent writes frontends.
            let ip = match ip.parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
                _ => ip.to_owned(),
            };
            format!(
                "{ip}:{}/{}",
                s["frontend"]["port"],
                s["frontend"]["proto"].as_str().unwrap_or("")
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------

/// Replies per backend name. Every request must have succeeded, the backend
/// must have seen `client` as the source (no SNAT) and the client's peer
/// (`getpeername` / UDP reply source) must be the address it asked for.
pub fn try_tally(
    results: &[ClientResult],
    client: Ipv4Addr,
) -> std::result::Result<BTreeMap<String, usize>, String> {
    let mut seen = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        if !r.ok {
            return Err(format!("request {i} failed: {r}"));
        }
        let (Some(name), Some(saw)) = (r.backend(), r.seen_client()) else {
            return Err(format!("request {i}: unparsable reply: {r}"));
        };
        if saw.ip() != IpAddr::V4(client) {
            return Err(format!(
                "request {i}: backend {name} saw source {saw}, not the client {client}: {r}"
            ));
        }
        *seen.entry(name.to_owned()).or_default() += 1;
    }
    Ok(seen)
}

/// [`try_tally`] that panics on failures, and checks the client's peer
/// address is `to` for every request.
#[track_caller]
pub fn tally(
    results: &[ClientResult],
    client: Ipv4Addr,
    to: impl Into<SocketAddr>,
) -> BTreeMap<String, usize> {
    let to = to.into();
    for (i, r) in results.iter().enumerate() {
        assert!(
            !r.ok || r.peer == Some(to),
            "request {i}: the client's peer is {:?}, not the address it asked for {to}: {r}",
            r.peer
        );
    }
    try_tally(results, client).unwrap_or_else(|e| panic!("{e}"))
}

/// The backend names of a tally, sorted.
pub fn names(t: &BTreeMap<String, usize>) -> Vec<&str> {
    t.keys().map(String::as_str).collect()
}

/// The last check of a scenario: `req` from `c` reaches only backends of
/// `want`, and the path under test did the work ([`Scenario::assert_path`]).
#[track_caller]
pub fn on_path(s: &Scenario, c: &PodClient, req: &Request, want: &[&str]) {
    let rs = s.assert_path(c, req);
    let t = tally(&rs, c.ip, req.to);
    assert!(
        names(&t).iter().all(|n| want.contains(n)),
        "{:?} {} from {} reached {t:?}, want {want:?}",
        req.proto,
        req.to,
        c.ip
    );
}

/// Replies per backend of a run of `req` from `c` ([`try_tally`]), and
/// the client's peer must be the address it asked for on every success.
pub fn backends(
    c: &PodClient,
    req: &Request,
) -> std::result::Result<BTreeMap<String, usize>, String> {
    let rs = c.run(req).map_err(|e| format!("{e:#}"))?;
    if let Some(r) = rs.iter().find(|r| r.ok && r.peer != Some(req.to)) {
        return Err(format!(
            "client peer is {:?}, not the address it asked for {}: {r}",
            r.peer, req.to
        ));
    }
    try_tally(&rs, c.ip)
}

/// Waits until a run of `req` from `c` reaches exactly the backends
/// `want`, then checks one more run reaches nothing else; returns that
/// run's replies per backend.
#[track_caller]
pub fn until_backends(
    c: &PodClient,
    req: &Request,
    want: &[&str],
    within: Duration,
) -> BTreeMap<String, usize> {
    eventually(within, || {
        let t = backends(c, req)?;
        if names(&t) == want {
            Ok(())
        } else {
            Err(format!(
                "{:?} {} from {} reached {t:?}, want {want:?}",
                req.proto, req.to, c.ip
            ))
        }
    });
    let t = backends(c, req).unwrap_or_else(|e| panic!("after converging: {e}"));
    assert!(
        names(&t).iter().all(|n| want.contains(n)),
        "{:?} {} from {}: after converging on {want:?} reached {t:?}",
        req.proto,
        req.to,
        c.ip
    );
    t
}

/// A request that must fail "at once" (refused, never a timeout).
pub const AT_ONCE: Duration = Duration::from_secs(1);

/// Waits until `proto` requests to `to` are refused, then checks five more
/// are refused at once (ECONNREFUSED / ICMP or ICMPv6 port unreachable,
/// never a timeout: requests wait up to 2 s, so a drop shows as
/// `TimedOut`).
#[track_caller]
pub fn until_refused(c: &PodClient, proto: Protocol, to: SocketAddr, within: Duration) {
    let req = Request {
        proto,
        ..Request::tcp(to)
    }
    .timeout(Duration::from_secs(2));
    eventually(within, || {
        let r = c.run(&req).map_err(|e| format!("{e:#}"))?.remove(0);
        if r.is_refused() {
            Ok(())
        } else {
            Err(format!("{proto:?} {to}: want refused, got {r}"))
        }
    });
    for r in c
        .run(&req.clone().count(5))
        .unwrap_or_else(|e| panic!("{e:#}"))
    {
        assert!(
            r.is_refused() && r.elapsed() < AT_ONCE,
            "{proto:?} {to}: want refused within {AT_ONCE:?}, got {r}"
        );
    }
}

/// Polls `f` every 20 ms until it returns `Ok`, panicking with the last
/// error after `within`.
#[track_caller]
pub fn eventually<T>(within: Duration, mut f: impl FnMut() -> std::result::Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("not within {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------
// Object builders
// ---------------------------------------------------------------------------

/// Something [`Scenario::apply`] can send to the API server.
pub trait KubeObject {
    fn to_json(&self) -> Value;

    /// The object as YAML.
    fn to_yaml(&self) -> String {
        serde_yaml::to_string(&self.to_json()).unwrap_or_default()
    }
}

/// A service port's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(p: u16) -> Self {
        TargetPort::Number(p)
    }
}

impl From<&str> for TargetPort {
    fn from(n: &str) -> Self {
        TargetPort::Name(n.to_owned())
    }
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `None` only for a service with a single port.
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
}

impl ServicePort {
    pub fn tcp(name: &str, port: u16, target: impl Into<TargetPort>) -> ServicePort {
        ServicePort {
            name: Some(name.to_owned()),
            port,
            protocol: Protocol::Tcp,
            target: target.into(),
        }
    }

    pub fn udp(name: &str, port: u16, target: impl Into<TargetPort>) -> ServicePort {
        ServicePort {
            protocol: Protocol::Udp,
            ..ServicePort::tcp(name, port, target)
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(n) = &self.name {
            m.insert("name".into(), json!(n));
        }
        m.insert("port".into(), json!(self.port));
        m.insert("protocol".into(), json!(self.protocol.k8s()));
        m.insert(
            "targetPort".into(),
            match &self.target {
                TargetPort::Number(p) => json!(p),
                TargetPort::Name(n) => json!(n),
            },
        );
        Value::Object(m)
    }
}

/// `spec.internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ServiceKind {
    /// `clusterIPs`: one address, or one of each family (primary first).
    ClusterIp(Vec<IpAddr>),
    Headless,
    ExternalName(String),
}

/// A `v1/Service` in namespace `default`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    kind: ServiceKind,
    ports: Vec<ServicePort>,
    labels: BTreeMap<String, String>,
    publish_not_ready: Option<bool>,
    /// `Some(timeout)`: sessionAffinity ClientIP (timeout `None` = default).
    affinity: Option<Option<u32>>,
    internal_policy: Option<TrafficPolicy>,
    /// Port name -> nodePort; non-empty makes the service `type: NodePort`.
    node_ports: BTreeMap<String, u16>,
    external_ips: Vec<IpAddr>,
    /// `type: LoadBalancer` with these ingress IPs (in `status`).
    lb_ingress: Vec<IpAddr>,
    source_ranges: Vec<String>,
    /// `spec.trafficDistribution`.
    traffic_distribution: Option<String>,
    annotations: BTreeMap<String, String>,
}

impl Service {
    /// `type: ClusterIP` with `clusterIP`/`clusterIPs` = `vip`, single
    /// stack of `vip`'s family (`ipFamilies`, `ipFamilyPolicy` filled in
    /// as the API server does).
    pub fn cluster_ip(name: &str, vip: impl Into<IpAddr>) -> Service {
        Service {
            name: name.to_owned(),
            kind: ServiceKind::ClusterIp(vec![vip.into()]),
            ports: Vec::new(),
            labels: BTreeMap::new(),
            publish_not_ready: None,
            affinity: None,
            internal_policy: None,
            node_ports: BTreeMap::new(),
            external_ips: Vec::new(),
            lb_ingress: Vec::new(),
            source_ranges: Vec::new(),
            traffic_distribution: None,
            annotations: BTreeMap::new(),
        }
    }

    /// `clusterIP: None`.
    pub fn headless(name: &str) -> Service {
        Service {
            kind: ServiceKind::Headless,
            ..Service::cluster_ip(name, Ipv4Addr::UNSPECIFIED)
        }
    }

    /// `type: ClusterIP`, dual-stack (`ipFamilyPolicy: RequireDualStack`):
    /// `clusterIPs` = [`primary`, `secondary`], of different families.
    pub fn dual_stack(name: &str, primary: IpAddr, secondary: IpAddr) -> Service {
        Service {
            kind: ServiceKind::ClusterIp(vec![primary, secondary]),
            ..Service::cluster_ip(name, primary)
        }
    }

    /// Turn into `type: ClusterIP` with `vip` (from any type).
    pub fn with_cluster_ip(mut self, vip: impl Into<IpAddr>) -> Service {
        self.kind = ServiceKind::ClusterIp(vec![vip.into()]);
        self
    }

    /// Turn into `type: ExternalName` (no cluster IP, as the API requires).
    pub fn with_external_name(mut self, host: &str) -> Service {
        self.kind = ServiceKind::ExternalName(host.to_owned());
        self
    }

    pub fn port(mut self, p: ServicePort) -> Service {
        self.ports.push(p);
        self
    }

    pub fn tcp(self, name: &str, port: u16, target: impl Into<TargetPort>) -> Service {
        self.port(ServicePort::tcp(name, port, target))
    }

    pub fn udp(self, name: &str, port: u16, target: impl Into<TargetPort>) -> Service {
        self.port(ServicePort::udp(name, port, target))
    }

    /// Drop the port named `name`.
    pub fn without_port(mut self, name: &str) -> Service {
        self.ports.retain(|p| p.name.as_deref() != Some(name));
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Service {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// `spec.trafficDistribution` (`PreferClose`, `PreferSameZone`,
    /// `PreferSameNode`). The fixture has no EndpointSlice controller: the
    /// hints it would write go on the slice's endpoints
    /// ([`Endpoint::for_zones`], [`Endpoint::for_nodes`]).
    pub fn traffic_distribution(mut self, value: &str) -> Service {
        self.traffic_distribution = Some(value.to_owned());
        self
    }

    /// An annotation (e.g. `service.kubernetes.io/topology-mode: Auto`).
    pub fn annotation(mut self, key: &str, value: &str) -> Service {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn without_label(mut self, key: &str) -> Service {
        self.labels.remove(key);
        self
    }

    pub fn publish_not_ready_addresses(mut self, on: bool) -> Service {
        self.publish_not_ready = Some(on);
        self
    }

    /// `sessionAffinity: ClientIP` with
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` (1..=86400).
    pub fn affinity_client_ip(mut self, timeout_seconds: u32) -> Service {
        self.affinity = Some(Some(timeout_seconds));
        self
    }

    /// `sessionAffinity: None`.
    pub fn no_affinity(mut self) -> Service {
        self.affinity = None;
        self
    }

    pub fn internal_traffic_policy(mut self, p: TrafficPolicy) -> Service {
        self.internal_policy = Some(p);
        self
    }

    /// `type: NodePort`, with `nodePort` for the port named `port_name`.
    pub fn node_port(mut self, port_name: &str, node_port: u16) -> Service {
        self.node_ports.insert(port_name.to_owned(), node_port);
        self
    }

    /// Add an `externalIPs` entry.
    pub fn external_ip(mut self, ip: impl Into<IpAddr>) -> Service {
        self.external_ips.push(ip.into());
        self
    }

    /// `type: LoadBalancer`, the load balancer's ingress IP in `status`,
    /// and `loadBalancerSourceRanges` (CIDRs; empty: any client).
    pub fn load_balancer(mut self, ingress: impl Into<IpAddr>, source_ranges: &[&str]) -> Service {
        self.lb_ingress.push(ingress.into());
        self.source_ranges = source_ranges.iter().map(|r| (*r).to_owned()).collect();
        self
    }
}

impl KubeObject for Service {
    fn to_json(&self) -> Value {
        let mut spec = Map::new();
        match &self.kind {
            ServiceKind::ClusterIp(vips) => {
                let ips: Vec<String> = vips.iter().map(IpAddr::to_string).collect();
                let families: Vec<&str> = vips.iter().map(|ip| ip_family(*ip)).collect();
                let policy = if vips.len() > 1 {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                };
                spec.insert("type".into(), json!("ClusterIP"));
                spec.insert("clusterIP".into(), json!(ips.first()));
                spec.insert("clusterIPs".into(), json!(ips));
                spec.insert("ipFamilies".into(), json!(families));
                spec.insert("ipFamilyPolicy".into(), json!(policy));
            }
            ServiceKind::Headless => {
                spec.insert("type".into(), json!("ClusterIP"));
                spec.insert("clusterIP".into(), json!("None"));
                spec.insert("clusterIPs".into(), json!(["None"]));
            }
            ServiceKind::ExternalName(host) => {
                spec.insert("type".into(), json!("ExternalName"));
                spec.insert("externalName".into(), json!(host));
            }
        }
        let mut ports: Vec<Value> = self.ports.iter().map(ServicePort::to_json).collect();
        if !self.node_ports.is_empty() && matches!(self.kind, ServiceKind::ClusterIp(_)) {
            spec.insert("type".into(), json!("NodePort"));
            for (p, sp) in ports.iter_mut().zip(&self.ports) {
                if let Some(np) = sp.name.as_ref().and_then(|n| self.node_ports.get(n)) {
                    p["nodePort"] = json!(np);
                }
            }
        }
        spec.insert("ports".into(), Value::Array(ports));
        let mut status = json!({});
        if !self.lb_ingress.is_empty() && matches!(self.kind, ServiceKind::ClusterIp(_)) {
            spec.insert("type".into(), json!("LoadBalancer"));
            if !self.source_ranges.is_empty() {
                spec.insert("loadBalancerSourceRanges".into(), json!(self.source_ranges));
            }
            let ingress: Vec<Value> = self
                .lb_ingress
                .iter()
                .map(|ip| json!({"ip": ip.to_string()}))
                .collect();
            status = json!({"loadBalancer": {"ingress": ingress}});
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(|i| i.to_string()).collect();
            spec.insert("externalIPs".into(), json!(ips));
        }
        if let Some(p) = self.publish_not_ready {
            spec.insert("publishNotReadyAddresses".into(), json!(p));
        }
        match self.affinity {
            Some(timeout) => {
                spec.insert("sessionAffinity".into(), json!("ClientIP"));
                spec.insert(
                    "sessionAffinityConfig".into(),
                    json!({"clientIP": {"timeoutSeconds": timeout.unwrap_or(10_800)}}),
                );
            }
            None => {
                spec.insert("sessionAffinity".into(), json!("None"));
            }
        }
        if let Some(t) = &self.traffic_distribution {
            spec.insert("trafficDistribution".into(), json!(t));
        }
        if let Some(p) = self.internal_policy {
            let v = match p {
                TrafficPolicy::Cluster => "Cluster",
                TrafficPolicy::Local => "Local",
            };
            spec.insert("internalTrafficPolicy".into(), json!(v));
        }
        let mut meta = Map::new();
        meta.insert("name".into(), json!(self.name));
        meta.insert("namespace".into(), json!("default"));
        if !self.labels.is_empty() {
            meta.insert("labels".into(), json!(self.labels));
        }
        if !self.annotations.is_empty() {
            meta.insert("annotations".into(), json!(self.annotations));
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": spec,
            "status": status,
        })
    }
}

/// `IPv4` or `IPv6`, as `ipFamilies` and `addressType` spell it.
fn ip_family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// One endpoint of an [`EndpointSlice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub node_name: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// `zone` (informational: the proxy reads the hints).
    pub zone: Option<String>,
    /// `hints.forZones[].name`.
    pub for_zones: Vec<String>,
    /// `hints.forNodes[].name`.
    pub for_nodes: Vec<String>,
}

impl Endpoint {
    /// `ip` on `node`, with all conditions unset (the API says: ready).
    pub fn at(ip: impl Into<IpAddr>, node: Option<&str>) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            node_name: node.map(str::to_owned),
            ready: None,
            serving: None,
            terminating: None,
            zone: None,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }
    }

    /// The endpoint's `zone`.
    pub fn zone(mut self, zone: &str) -> Endpoint {
        self.zone = Some(zone.to_owned());
        self
    }

    /// `hints.forZones`, as the EndpointSlice controller writes them
    /// (PreferClose / PreferSameZone: the endpoint's own zone; topology
    /// mode Auto: zones it balanced onto this endpoint).
    pub fn for_zones(mut self, zones: &[&str]) -> Endpoint {
        self.for_zones = zones.iter().map(|z| (*z).to_owned()).collect();
        self
    }

    /// `hints.forNodes` (PreferSameNode: the endpoint's own node).
    pub fn for_nodes(mut self, nodes: &[&str]) -> Endpoint {
        self.for_nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
        self
    }

    /// Sets the three conditions.
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        self.ready = Some(ready);
        self.serving = Some(serving);
        self.terminating = Some(terminating);
        self
    }

    /// ready, serving, not terminating.
    pub fn ready(pod: &Pod) -> Endpoint {
        Endpoint::at(pod.ip, Some(&pod.node_name)).conditions(true, true, false)
    }

    /// Not ready, not serving, not terminating (a pod failing readiness).
    pub fn not_ready(pod: &Pod) -> Endpoint {
        Endpoint::at(pod.ip, Some(&pod.node_name)).conditions(false, false, false)
    }

    /// Serving and terminating (graceful shutdown, still passing readiness).
    pub fn terminating(pod: &Pod) -> Endpoint {
        Endpoint::at(pod.ip, Some(&pod.node_name)).conditions(false, true, true)
    }

    /// Terminating and no longer serving.
    pub fn terminating_not_serving(pod: &Pod) -> Endpoint {
        Endpoint::at(pod.ip, Some(&pod.node_name)).conditions(false, false, true)
    }

    /// No conditions at all (nil = ready/serving per the API).
    pub fn unknown(pod: &Pod) -> Endpoint {
        Endpoint::at(pod.ip, Some(&pod.node_name))
    }

    /// This endpoint at the pod's IPv6 address instead (for an IPv6 slice).
    pub fn ipv6(mut self, pod: &Pod) -> Endpoint {
        self.ip = pod.ip6.into();
        self
    }

    fn to_json(&self) -> Value {
        let mut cond = Map::new();
        for (k, v) in [
            ("ready", self.ready),
            ("serving", self.serving),
            ("terminating", self.terminating),
        ] {
            if let Some(v) = v {
                cond.insert(k.into(), json!(v));
            }
        }
        let mut m = Map::new();
        m.insert("addresses".into(), json!([self.ip.to_string()]));
        m.insert("conditions".into(), Value::Object(cond));
        if let Some(n) = &self.node_name {
            m.insert("nodeName".into(), json!(n));
        }
        if let Some(z) = &self.zone {
            m.insert("zone".into(), json!(z));
        }
        let names = |l: &[String]| -> Vec<Value> { l.iter().map(|n| json!({"name": n})).collect() };
        let mut hints = Map::new();
        if !self.for_zones.is_empty() {
            hints.insert("forZones".into(), json!(names(&self.for_zones)));
        }
        if !self.for_nodes.is_empty() {
            hints.insert("forNodes".into(), json!(names(&self.for_nodes)));
        }
        if !hints.is_empty() {
            m.insert("hints".into(), Value::Object(hints));
        }
        Value::Object(m)
    }
}

/// A `discovery.k8s.io/v1` EndpointSlice of a service in `default`; its
/// `addressType` is the family of its endpoints (IPv4 when it has none,
/// unless [`EndpointSlice::ipv6`]): Kubernetes keeps one slice per family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub name: String,
    pub service: String,
    ports: Vec<(Option<String>, u16, Protocol)>,
    endpoints: Vec<Endpoint>,
    labels: BTreeMap<String, String>,
    ipv6: bool,
}

impl EndpointSlice {
    /// Slice `name` of service `service` (label `kubernetes.io/service-name`).
    pub fn new(name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            name: name.to_owned(),
            service: service.to_owned(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            labels: BTreeMap::new(),
            ipv6: false,
        }
    }

    /// `addressType: IPv6` even while it has no endpoints.
    pub fn ipv6(mut self) -> EndpointSlice {
        self.ipv6 = true;
        self
    }

    /// A port: `name` is the *service* port's name (`None`/"" for a
    /// single unnamed port), `port` the endpoints' number.
    pub fn port(mut self, name: Option<&str>, port: u16, protocol: Protocol) -> EndpointSlice {
        self.ports.push((name.map(str::to_owned), port, protocol));
        self
    }

    pub fn tcp_port(self, name: &str, port: u16) -> EndpointSlice {
        self.port(Some(name), port, Protocol::Tcp)
    }

    pub fn udp_port(self, name: &str, port: u16) -> EndpointSlice {
        self.port(Some(name), port, Protocol::Udp)
    }

    pub fn without_port(mut self, name: &str) -> EndpointSlice {
        self.ports.retain(|(n, _, _)| n.as_deref() != Some(name));
        self
    }

    pub fn endpoint(mut self, e: Endpoint) -> EndpointSlice {
        self.endpoints.retain(|x| x.ip != e.ip);
        self.endpoints.push(e);
        self
    }

    /// Replace all endpoints.
    pub fn endpoints(mut self, eps: impl IntoIterator<Item = Endpoint>) -> EndpointSlice {
        self.endpoints = Vec::new();
        for e in eps {
            self = self.endpoint(e);
        }
        self
    }

    pub fn without_endpoint(mut self, ip: impl Into<IpAddr>) -> EndpointSlice {
        let ip = ip.into();
        self.endpoints.retain(|e| e.ip != ip);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> EndpointSlice {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub fn without_label(mut self, key: &str) -> EndpointSlice {
        self.labels.remove(key);
        self
    }
}

impl KubeObject for EndpointSlice {
    fn to_json(&self) -> Value {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/service-name".into(), self.service.clone());
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(name, port, proto)| {
                json!({
                    "name": name.clone().unwrap_or_default(),
                    "port": port,
                    "protocol": proto.k8s(),
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": "default",
                "labels": labels,
            },
            "addressType": match self.endpoints.first() {
                Some(e) => ip_family(e.ip),
                None if self.ipv6 => "IPv6",
                None => "IPv4",
            },
            "ports": ports,
            "endpoints": self.endpoints.iter().map(Endpoint::to_json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_as_the_api_server_fills_them() {
        let v4: IpAddr = "10.96.0.10".parse().expect("v4");
        let v6: IpAddr = "fd00:96::10".parse().expect("v6");
        let single = Service::cluster_ip("a", v6).tcp("http", 80, 8080).to_json();
        assert_eq!(single["spec"]["clusterIP"], "fd00:96::10");
        assert_eq!(single["spec"]["ipFamilies"], json!(["IPv6"]));
        assert_eq!(single["spec"]["ipFamilyPolicy"], "SingleStack");
        let dual = Service::dual_stack("b", v4, v6).to_json();
        assert_eq!(dual["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(
            dual["spec"]["clusterIPs"],
            json!(["10.96.0.10", "fd00:96::10"])
        );
        assert_eq!(dual["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(dual["spec"]["ipFamilyPolicy"], "RequireDualStack");
        let ep6 = Endpoint::at(v6, Some("node1"));
        let slice = EndpointSlice::new("b-v6", "b").endpoint(ep6).to_json();
        assert_eq!(slice["addressType"], "IPv6");
        assert_eq!(slice["endpoints"][0]["addresses"], json!(["fd00:96::10"]));
        assert_eq!(
            EndpointSlice::new("e", "b").to_json()["addressType"],
            "IPv4"
        );
        assert_eq!(
            EndpointSlice::new("e", "b").ipv6().to_json()["addressType"],
            "IPv6"
        );
    }

    #[test]
    fn results_round_trip() {
        let ok = r#"{"ok":true,"reply":"pod-1-2 10.244.1.2:40000","peer":"10.96.0.10:80","elapsed_ms":1.5}"#;
        let r: ClientResult = serde_json::from_str(ok).expect("parse ok");
        assert!(r.ok);
        assert_eq!(r.backend(), Some("pod-1-2"));
        assert_eq!(
            r.seen_client(),
            Some("10.244.1.2:40000".parse().expect("addr"))
        );
        let bad = r#"{"ok":false,"error":"timed_out","detail":"connect","elapsed_ms":1000.0}"#;
        let r: ClientResult = serde_json::from_str(bad).expect("parse err");
        assert_eq!(r.error, Some(ErrorKind::TimedOut));
        assert_eq!(r.elapsed(), Duration::from_secs(1));
        let back = serde_json::to_string(&r).expect("ser");
        assert!(back.contains(r#""error":"timed_out""#), "{back}");
        assert!(!back.contains("reply"), "{back}");
        let ws: ClientResult =
            serde_json::from_str(r#"{"ok":false,"error":"wrong_source","elapsed_ms":1}"#)
                .expect("ws");
        assert_eq!(ws.error, Some(ErrorKind::WrongSource));
    }

    #[test]
    fn tally_checks_source_and_peer() {
        let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
        let mk = |name: &str, src: &str| ClientResult {
            ok: true,
            reply: Some(format!("{name} {src}:1234")),
            peer: Some(vip),
            local: None,
            error: None,
            detail: None,
            elapsed_ms: 1.0,
        };
        let client = Ipv4Addr::new(10, 244, 1, 2);
        let rs = vec![
            mk("a", "10.244.1.2"),
            mk("b", "10.244.1.2"),
            mk("a", "10.244.1.2"),
        ];
        let t = tally(&rs, client, vip);
        assert_eq!(t.get("a"), Some(&2));
        assert_eq!(names(&t), vec!["a", "b"]);
        let snat = vec![mk("a", "10.244.1.1")];
        assert!(try_tally(&snat, client).is_err());
        let mut wrong_peer = mk("a", "10.244.1.2");
        wrong_peer.peer = Some("10.244.2.2:8080".parse().expect("addr"));
        let r = std::panic::catch_unwind(|| tally(&[wrong_peer], client, vip));
        assert!(r.is_err(), "a peer other than the VIP is caught");
    }

    #[test]
    fn object_builders() {
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let svc = Service::cluster_ip("web", vip)
            .tcp("http", 80, "web")
            .udp("dns", 53, 5353)
            .label("service.kubernetes.io/service-proxy-name", "other")
            .affinity_client_ip(3)
            .internal_traffic_policy(TrafficPolicy::Local)
            .publish_not_ready_addresses(true);
        let v = svc.to_json();
        assert_eq!(v["spec"]["clusterIPs"][0], "10.96.0.10");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], "web");
        assert_eq!(v["spec"]["ports"][1]["targetPort"], 5353);
        assert_eq!(v["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(
            v["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            3
        );
        assert_eq!(v["spec"]["internalTrafficPolicy"], "Local");
        assert_eq!(v["spec"]["publishNotReadyAddresses"], true);
        assert_eq!(
            v["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"],
            "other"
        );
        let en = svc.clone().with_external_name("example.com").to_json();
        assert_eq!(en["spec"]["type"], "ExternalName");
        assert!(en["spec"].get("clusterIP").is_none());
        let v = svc.without_port("http").no_affinity().to_json();
        assert_eq!(v["spec"]["ports"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["spec"]["sessionAffinity"], "None");
        assert_eq!(
            Service::headless("h").to_json()["spec"]["clusterIP"],
            "None"
        );

        let ip = Ipv4Addr::new(10, 244, 1, 3);
        let s = EndpointSlice::new("web-a", "web")
            .tcp_port("http", 8080)
            .endpoint(Endpoint::at(ip, Some("node1")).conditions(false, true, true))
            .endpoint(Endpoint::at(Ipv4Addr::new(10, 244, 2, 2), None));
        let v = s.to_json();
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(v["ports"][0]["port"], 8080);
        assert_eq!(v["endpoints"][0]["conditions"]["terminating"], true);
        assert_eq!(v["endpoints"][0]["nodeName"], "node1");
        assert!(
            v["endpoints"][1]["conditions"]
                .as_object()
                .is_some_and(Map::is_empty)
        );
        assert!(v["endpoints"][1].get("nodeName").is_none());
        let v = s.without_endpoint(ip).to_json();
        assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(1));
        // The YAML is what the API server fixture accepts.
        let api = ApiServer::start().expect("api");
        let y = Service::cluster_ip("web", vip)
            .tcp("http", 80, 8080)
            .to_yaml();
        api.apply_yaml(&y).expect("apply service yaml");
        assert!(api.get("Service", Some("default"), "web").is_some());
    }

    #[test]
    fn iptables_frontends_from_save() {
        let save = r#"# Generated by iptables-save
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "172.18.0.11:30081/TCP has no endpoints" -m conntrack --ctorigdst 172.18.0.11 --ctorigdstport 30081 -j REJECT --reject-with tcp-reset
-A KUBE-SERVICES -p udp -m comment --comment "10.96.0.30:53/UDP has no endpoints" -m conntrack --ctorigdst 10.96.0.30 --ctorigdstport 53 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-FIREWALL -m comment --comment "dropped by loadBalancerSourceRanges" -m mark --mark 0x8000/0x8000 -j DROP
-A OTHER -d 10.1.1.1/32 -p tcp -m tcp --dport 1 -j REJECT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.30/32 -p udp -m comment --comment "10.96.0.30:53/UDP has no endpoints" -m udp --dport 53 -j REDIRECT
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "10.96.0.10:80/TCP ClusterIp" -m tcp --dport 80 -j KUBE-SVC-WESOCUMFJNA3TIAO
-A KUBE-SERVICES -d 192.0.2.43/32 -p tcp -m comment --comment "192.0.2.43:80/TCP LoadBalancer" -m tcp --dport 80 -j KUBE-FW-3LSLERTCZJ4MGUEI
-A KUBE-SERVICES -m comment --comment "node ports; must be last" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -d 172.18.0.11/32 -p tcp -m comment --comment "172.18.0.11:30080/TCP NodePort" -m tcp --dport 30080 -j KUBE-EXT-2MZXRD3S3POEDILG
-A KUBE-SEP-6EPOP7AGCIGFPQNE -p tcp -m tcp -j DNAT --to-destination 10.244.2.2:8080
-A DOCKER -d 10.9.9.9/32 -p tcp -m tcp --dport 9 -j KUBE-SVC-X
COMMIT
"#;
        assert_eq!(
            iptables_frontends(save),
            [
                "10.96.0.10:80/TCP",
                "10.96.0.30:53/UDP",
                "172.18.0.11:30080/TCP",
                "172.18.0.11:30081/TCP",
                "192.0.2.43:80/TCP",
            ]
        );
        assert!(iptables_frontends("*nat\nCOMMIT\n").is_empty());
        // ip6tables-save: `/128` kept on -d, dropped on --ctorigdst.
        let save6 = "*filter\n-A KUBE-SERVICES -p tcp -m comment --comment \"x\" -m conntrack --ctorigdst fd00:96::30 --ctorigdstport 80 -j REJECT --reject-with tcp-reset\nCOMMIT\n*nat\n-A KUBE-NODEPORTS -d fd00:18::11/128 -p tcp -m comment --comment \"y\" -m tcp --dport 30080 -j KUBE-EXT-2MZXRD3S3POEDILG\nCOMMIT\n";
        assert_eq!(
            iptables_frontends(save6),
            ["[fd00:18::11]:30080/TCP", "[fd00:96::30]:80/TCP"]
        );
        let counted = "*filter\n[7:420] -A KUBE-FIREWALL -m comment --comment \"dropped by loadBalancerSourceRanges\" -m mark --mark 0x8000/0x8000 -j DROP\n[3:1] -A KUBE-SERVICES -j REJECT\nCOMMIT\n";
        assert_eq!(iptables_source_range_drops(counted), 7);
    }

    #[test]
    fn whole_addresses_are_mentioned() {
        let ip = Ipv4Addr::new(10, 96, 200, 16);
        assert!(mentions_ip("-d 10.96.200.16/32 -p tcp", ip));
        assert!(mentions_ip("10.96.200.16 . tcp . 80 : goto svc-A", ip));
        assert!(mentions_ip("\"10.96.200.16:80/TCP has no endpoints\"", ip));
        assert!(mentions_ip("10.96.200.16", ip));
        assert!(!mentions_ip("-d 10.96.200.160/32", ip));
        assert!(!mentions_ip("110.96.200.16", ip));
        assert!(!mentions_ip("1.10.96.200.16", ip));
        assert!(!mentions_ip("10.96.200.16.7", ip));
        assert!(mentions_ip("ends with 10.96.200.16.", ip));
    }

    #[test]
    fn nft_frontends_from_json() {
        let list = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "kube-proxy-rs"}},
            {"map": {"name": "service-ips", "elem": [
                [{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc-A"}}],
            ]}},
            {"map": {"name": "no-endpoint-services", "elem": [
                [{"concat": ["10.96.0.30", "udp", 53]}, {"goto": {"target": "reject-chain"}}],
            ]}},
            {"map": {"name": "firewall-ips", "elem": [
                [{"concat": ["192.0.2.43", "tcp", 80]}, {"goto": {"target": "fw-B"}}],
            ]}},
            {"map": {"name": "service-nodeports", "elem": [
                [{"concat": ["tcp", 30080]}, {"goto": {"target": "ext-C"}}],
            ]}},
            {"map": {"name": "no-endpoint-nodeports"}},
            {"set": {"name": "nodeport-ips", "elem": ["172.18.0.11", "172.18.0.12"]}},
        ]});
        assert_eq!(
            nft_frontends(&list).expect("parse"),
            [
                "10.96.0.10:80/TCP",
                "10.96.0.30:53/UDP",
                "172.18.0.11:30080/TCP",
                "172.18.0.12:30080/TCP",
                "192.0.2.43:80/TCP",
            ]
        );
        assert!(
            nft_frontends(&json!({"nftables": []}))
                .expect("empty")
                .is_empty()
        );
        let text = "table ip kube-proxy-rs {\n\tchain fw-B {\n\t\tip saddr { 10.244.1.2/32 } return\n\t\tcounter packets 4 bytes 240 drop\n\t}\n\tchain reject-chain {\n\t\tmeta l4proto tcp counter packets 9 bytes 1 reject with tcp reset\n\t\tcounter packets 2 bytes 1 drop\n\t}\n}\n";
        assert_eq!(nft_source_range_drops(text), 4);
    }

    #[test]
    fn podclient_lookup_names_the_binary() {
        match podclient_path() {
            Ok(p) => assert!(p.ends_with("podclient")),
            Err(e) => assert!(format!("{e:#}").contains("podclient"), "{e:#}"),
        }
    }

    #[test]
    fn request_args() {
        let r = Request::udp(SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 53)))
            .count(3)
            .timeout(Duration::from_millis(250))
            .sport_spread();
        assert_eq!(
            r.args().join(" "),
            "--proto udp --to 10.96.0.10:53 --count 3 --timeout-ms 250 --sport-spread"
        );
        assert!(r.deadline() >= Duration::from_millis(750));
    }
}
