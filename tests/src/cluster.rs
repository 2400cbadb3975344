//! A small Kubernetes-like cluster made of network namespaces, routed like
//! kind's kindnet (CNI `ptp` plugin), plus traffic helpers for scenario tests.
//!
//! Layout for node `i` (1-based) and pod `j` (1-based):
//!
//! ```text
//!  underlay ns: br0 ── n1, n2, ..., ext          (veth ends, bridge ports)
//!  node i ns:   eth0 172.18.0.(10+i)/24          (peer of n<i>)
//!               ip_forward=1, rp_filter=0
//!               10.244.k.0/24 via 172.18.0.(10+k) dev eth0     (k != i)
//!               vethXXXXXXXX 10.244.i.1/32                      (per pod)
//!               10.244.i.(j+1) dev vethXXXXXXXX scope link      (per pod)
//!  pod i-j ns:  eth0 10.244.i.(j+1)/24 (no prefix route)
//!               10.244.i.1 dev eth0 scope link
//!               10.244.i.0/24 via 10.244.i.1 dev eth0
//!               default via 10.244.i.1 dev eth0
//!  external ns: eth0 172.18.0.100/24 (underlay only, like an outside host)
//! ```
//!
//! The cluster is dual-stack: every address above has an IPv6 twin whose
//! last group is written with the same digits (`172.18.0.11` ->
//! `fd00:18::11`, `10.244.1.2` -> `fd00:244:1::2`, pod CIDR
//! `fd00:244:1::/64`, gateway `fd00:244:1::1/128` on every host-side veth,
//! external client `fd00:18::100/64`), routed the same way. IPv6 addresses
//! are added without duplicate address detection (`nodad`, and
//! `accept_dad=0` for link-local ones), so they are usable at once; nodes
//! forward IPv6 and send ICMPv6 errors without rate limit.
//!
//! Interfaces are always created directly inside their target namespaces, so
//! nothing ever appears in the root namespace.

use std::collections::HashSet;
use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::mem::{size_of, zeroed};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream,
    UdpSocket,
};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// Name of the bridge in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Underlay prefix length (`172.18.0.0/24`).
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The external client's underlay address.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// The whole pod network (`10.244.0.0/16`).
pub const POD_NETWORK: &str = "10.244.0.0/16";
/// The external client's IPv6 underlay address.
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x100);
/// IPv6 underlay prefix length (`fd00:18::/64`).
pub const UNDERLAY_PREFIX_LEN6: u8 = 64;
/// The whole IPv6 pod network (`fd00:244::/32`).
pub const POD_NETWORK6: &str = "fd00:244::/32";

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of nodes (1..=89).
    pub nodes: usize,
    /// Pods on every node (0..=250).
    pub pods_per_node: usize,
    /// Whether to add an external client on the underlay.
    pub external_client: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            external_client: true,
        }
    }
}

/// Underlay address of node `i` (1-based).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, octet(10 + i))
}

/// IPv6 underlay address of node `i` (1-based): `fd00:18::(10+i)`.
pub fn node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, same_digits(10 + i))
}

/// IPv6 pod CIDR of node `i` (1-based): `fd00:244:i::/64`.
pub fn pod_cidr6(i: usize) -> String {
    format!("fd00:244:{i}::/64")
}

/// IPv6 gateway of node `i`'s pods: `fd00:244:i::1`.
pub fn gateway_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, same_digits(i), 0, 0, 0, 0, 1)
}

/// IPv6 address of pod `j` on node `i`: `fd00:244:i::(j+1)`.
pub fn pod_ip6(i: usize, j: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x244,
        same_digits(i),
        0,
        0,
        0,
        0,
        same_digits(j + 1),
    )
}

/// A group whose hex digits read like `v`'s decimal ones (11 -> 0x11), so
/// IPv6 addresses mirror their IPv4 twins; `v` is at most 999 here.
fn same_digits(v: usize) -> u16 {
    u16::from_str_radix(&v.min(999).to_string(), 16).unwrap_or(u16::MAX)
}

/// Pod CIDR of node `i` (1-based): `10.244.i.0/24`.
pub fn pod_cidr(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

/// Gateway (host-side veth address) of node `i`'s pods: `10.244.i.1`.
pub fn gateway_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(i), 1)
}

/// Address of pod `j` on node `i` (both 1-based): `10.244.i.(j+1)`.
pub fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(i), octet(j + 1))
}

fn octet(v: usize) -> u8 {
    u8::try_from(v).unwrap_or(u8::MAX)
}

/// Host-side veth name for a pod, `veth` + 8 hex digits derived from the pod
/// name (FNV-1a), the shape kindnet/CNI use; matches the glob `veth*`.
pub fn host_veth_name(pod_name: &str) -> String {
    format!("veth{:08x}", fnv1a(pod_name.as_bytes()))
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// A pod: its own namespace with `eth0`, wired to its node with a veth pair.
#[derive(Debug)]
pub struct Pod {
    /// `pod-<node>-<j>`.
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// `fd00:244:i::(j+1)`.
    pub ip6: Ipv6Addr,
    /// Name of the node the pod runs on (`node<i>`).
    pub node_name: String,
    /// 1-based index of the node.
    pub node_index: usize,
    /// Name of the host-side veth in the node namespace.
    pub host_veth: String,
}

impl Pod {
    /// Turns TX checksum offload of the pod's `eth0` on or off
    /// (`ethtool -K eth0 tx on|off`).
    pub fn set_tx_checksum(&self, on: bool) -> Result<()> {
        set_tx_checksum(&self.ns, "eth0", on)
    }
}

/// Turns TX checksum offload of `dev` in `ns` on or off with ethtool.
pub fn set_tx_checksum(ns: &Netns, dev: &str, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    match ns.exec(&["ethtool", "-K", dev, "tx", state]) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = format!("{e:#}");
            if msg.contains("No such file") || msg.contains("not found") {
                bail!("ethtool is not installed (needed for `ethtool -K {dev} tx {state}`): {msg}")
            }
            Err(e).with_context(|| format!("ethtool -K {dev} tx {state} in {}", ns.name()))
        }
    }
}

/// A node: a namespace that forwards between its pods and the underlay.
#[derive(Debug)]
pub struct Node {
    /// `node<i>`.
    pub name: String,
    /// 1-based index.
    pub index: usize,
    /// Pods of this node; declared before `ns` so they are dropped first.
    pub pods: Vec<Pod>,
    pub ns: Netns,
    /// `eth0` address on the underlay (`172.18.0.(10+i)`).
    pub underlay_ip: Ipv4Addr,
    /// `10.244.i.0/24`.
    pub pod_cidr: String,
    /// `10.244.i.1`, held by every host-side veth.
    pub gateway_ip: Ipv4Addr,
    /// `fd00:18::(10+i)`.
    pub underlay_ip6: Ipv6Addr,
    /// `fd00:244:i::/64`.
    pub pod_cidr6: String,
    /// `fd00:244:i::1`, held by every host-side veth.
    pub gateway_ip6: Ipv6Addr,
}

impl Node {
    /// Pod `j` (1-based) of this node.
    ///
    /// # Panics
    /// If there is no such pod.
    pub fn pod(&self, j: usize) -> &Pod {
        j.checked_sub(1)
            .and_then(|k| self.pods.get(k))
            .unwrap_or_else(|| panic!("{} has no pod {j} (it has {})", self.name, self.pods.len()))
    }
}

/// The external client: an outside host on the underlay.
#[derive(Debug)]
pub struct External {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl External {
    /// `ip route add DST via VIA` inside the client, e.g. to reach the pod
    /// network or a service range through a node.
    pub fn add_route(&self, dst: &str, via: impl Into<IpAddr>) -> Result<()> {
        let via = via.into();
        self.ns
            .ip(&["route", "add", dst, "via", &via.to_string()])
            .map(drop)
            .with_context(|| format!("adding route {dst} via {via} on the external client"))
    }
}

/// The whole cluster. Dropping it deletes every namespace (pods, nodes,
/// external client, underlay, in that order); veths vanish with them.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    nodes: Vec<Node>,
    external: Option<External>,
    underlay: Netns,
}

impl Cluster {
    /// A `v1/Node` object per node (name and two InternalIPs: the IPv4 and
    /// the IPv6 underlay address, in that order, as a dual-stack kubelet
    /// reports them), as multi-document YAML for the API server fixture.
    pub fn node_objects_yaml(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {}}}, {{type: InternalIP, address: \"{}\"}}]\n---\n",
                    n.name, n.underlay_ip, n.underlay_ip6
                )
            })
            .collect()
    }

    /// Builds the cluster described by `spec`.
    pub fn new(spec: ClusterSpec) -> Result<Self> {
        if spec.nodes == 0 || spec.nodes > 89 {
            bail!("ClusterSpec.nodes must be in 1..=89, got {}", spec.nodes);
        }
        if spec.pods_per_node > 250 {
            bail!(
                "ClusterSpec.pods_per_node must be <= 250, got {}",
                spec.pods_per_node
            );
        }
        let started = Instant::now();

        // Namespaces first: if anything below fails, dropping these partial
        // values deletes whatever was created.
        let underlay = Netns::new("ul")?;
        let external = if spec.external_client {
            Some(External {
                ns: Netns::new("ext")?,
                ip: EXTERNAL_IP,
                ip6: EXTERNAL_IP6,
            })
        } else {
            None
        };
        let mut nodes = Vec::with_capacity(spec.nodes);
        for i in 1..=spec.nodes {
            let name = format!("node{i}");
            let ns = Netns::new(&name)?;
            // Before any interface exists, so `default` applies to them all.
            for (key, value) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                // Tests ask many times a second; the kernel's per-peer ICMP
                // rate limit (burst 6, then 1/s) would turn a refusal sent
                // with icmp_send() (iptables/nft REJECT) into a timeout.
                ("net.ipv4.icmp_ratelimit", "0"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.icmp.ratelimit", "0"),
            ] {
                ns.sysctl(key, value)?;
            }
            let mut pods = Vec::with_capacity(spec.pods_per_node);
            let mut veths = HashSet::new();
            for j in 1..=spec.pods_per_node {
                let pod_name = format!("pod-{i}-{j}");
                let mut host_veth = host_veth_name(&pod_name);
                let mut salt = 0u32;
                while !veths.insert(host_veth.clone()) {
                    salt += 1;
                    host_veth = host_veth_name(&format!("{pod_name}#{salt}"));
                }
                pods.push(Pod {
                    ns: Netns::new(&format!("p{i}-{j}"))?,
                    ip: pod_ip(i, j),
                    ip6: pod_ip6(i, j),
                    node_name: name.clone(),
                    node_index: i,
                    host_veth,
                    name: pod_name,
                });
            }
            nodes.push(Node {
                name,
                index: i,
                pods,
                ns,
                underlay_ip: node_ip(i),
                pod_cidr: pod_cidr(i),
                gateway_ip: gateway_ip(i),
                underlay_ip6: node_ip6(i),
                pod_cidr6: pod_cidr6(i),
                gateway_ip6: gateway_ip6(i),
            });
        }
        let cluster = Self {
            spec,
            nodes,
            external,
            underlay,
        };
        // Before any interface exists: link-local addresses skip duplicate
        // address detection too (global ones are added `nodad`), and no
        // router solicitations are sent.
        for ns in cluster.namespaces() {
            for (key, value) in [
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv6.conf.default.router_solicitations", "0"),
            ] {
                ns.sysctl(key, value)?;
            }
        }
        cluster.wire()?;
        tracing::debug!(elapsed = ?started.elapsed(), ?spec, "cluster built");
        Ok(cluster)
    }

    fn wire(&self) -> Result<()> {
        // Underlay: bridge plus one veth pair per member; the member end is
        // created directly in the member's namespace as `eth0`.
        // No multicast snooping: IPv6 neighbour solicitations go to
        // solicited-node groups nobody reports for.
        let mut ul = format!(
            "link add {UNDERLAY_BRIDGE} type bridge mcast_snooping 0\nlink set {UNDERLAY_BRIDGE} up\n"
        );
        for node in &self.nodes {
            let port = format!("n{}", node.index);
            ul.push_str(&format!(
                "link add {port} type veth peer name eth0 netns {}\nlink set {port} master {UNDERLAY_BRIDGE} up\n",
                node.ns.name()
            ));
        }
        if let Some(ext) = &self.external {
            ul.push_str(&format!(
                "link add ext type veth peer name eth0 netns {}\nlink set ext master {UNDERLAY_BRIDGE} up\n",
                ext.ns.name()
            ));
        }
        self.underlay.ip_batch(&ul).context("wiring the underlay")?;

        for node in &self.nodes {
            let i = node.index;
            let mut script = format!(
                "addr add {}/{UNDERLAY_PREFIX_LEN} dev eth0\n\
                 addr add {}/{UNDERLAY_PREFIX_LEN6} dev eth0 nodad\n\
                 link set eth0 up\n",
                node.underlay_ip, node.underlay_ip6
            );
            for other in self.nodes.iter().filter(|o| o.index != i) {
                script.push_str(&format!(
                    "route add {} via {} dev eth0\nroute add {} via {} dev eth0\n",
                    other.pod_cidr, other.underlay_ip, other.pod_cidr6, other.underlay_ip6
                ));
            }
            for pod in &node.pods {
                let veth = &pod.host_veth;
                script.push_str(&format!(
                    "link add {veth} type veth peer name eth0 netns {pod_ns}\n\
                     addr add {gw}/32 dev {veth}\n\
                     addr add {gw6}/128 dev {veth} nodad\n\
                     link set {veth} up\n\
                     route add {ip}/32 dev {veth} scope link\n\
                     route add {ip6}/128 dev {veth}\n",
                    pod_ns = pod.ns.name(),
                    gw = node.gateway_ip,
                    ip = pod.ip,
                    gw6 = node.gateway_ip6,
                    ip6 = pod.ip6,
                ));
            }
            node.ns
                .ip_batch(&script)
                .with_context(|| format!("wiring {}", node.name))?;
        }

        std::thread::scope(|s| -> Result<()> {
            let mut jobs = Vec::new();
            for node in &self.nodes {
                for pod in &node.pods {
                    let script = format!(
                        "addr add {ip}/24 dev eth0 noprefixroute\n\
                         addr add {ip6}/64 dev eth0 nodad noprefixroute\n\
                         link set eth0 up\n\
                         route add {gw}/32 dev eth0 scope link src {ip}\n\
                         route add {cidr} via {gw} dev eth0 src {ip}\n\
                         route add default via {gw} dev eth0\n\
                         route add {gw6}/128 dev eth0 src {ip6}\n\
                         route add {cidr6} via {gw6} dev eth0 src {ip6}\n\
                         route add ::/0 via {gw6} dev eth0\n",
                        ip = pod.ip,
                        gw = node.gateway_ip,
                        cidr = node.pod_cidr,
                        ip6 = pod.ip6,
                        gw6 = node.gateway_ip6,
                        cidr6 = node.pod_cidr6,
                    );
                    jobs.push(s.spawn(move || {
                        pod.ns
                            .ip_batch(&script)
                            .with_context(|| format!("wiring {}", pod.name))
                    }));
                }
            }
            if let Some(ext) = &self.external {
                let script = format!(
                    "addr add {}/{UNDERLAY_PREFIX_LEN} dev eth0\n\
                     addr add {}/{UNDERLAY_PREFIX_LEN6} dev eth0 nodad\n\
                     link set eth0 up\n",
                    ext.ip, ext.ip6
                );
                jobs.push(s.spawn(move || {
                    ext.ns
                        .ip_batch(&script)
                        .context("wiring the external client")
                }));
            }
            for job in jobs {
                match job.join() {
                    Ok(r) => r?,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok(())
        })
    }

    /// The spec this cluster was built from.
    pub fn spec(&self) -> ClusterSpec {
        self.spec
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i` (1-based).
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node(&self, i: usize) -> &Node {
        i.checked_sub(1)
            .and_then(|k| self.nodes.get(k))
            .unwrap_or_else(|| panic!("cluster has no node {i} (it has {})", self.nodes.len()))
    }

    /// Pod `j` on node `i` (both 1-based).
    ///
    /// # Panics
    /// If there is no such pod.
    pub fn pod(&self, i: usize, j: usize) -> &Pod {
        self.node(i).pod(j)
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The external client.
    ///
    /// # Panics
    /// If the cluster was built with `external_client: false`.
    pub fn external(&self) -> &External {
        self.external
            .as_ref()
            .unwrap_or_else(|| panic!("cluster was built without an external client"))
    }

    /// The external client, if the spec asked for one.
    pub fn try_external(&self) -> Option<&External> {
        self.external.as_ref()
    }

    /// The underlay namespace (holds `br0`).
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// Every namespace of this cluster.
    fn namespaces(&self) -> impl Iterator<Item = &Netns> {
        std::iter::once(&self.underlay)
            .chain(self.external.iter().map(|e| &e.ns))
            .chain(
                self.nodes
                    .iter()
                    .flat_map(|n| std::iter::once(&n.ns).chain(n.pods.iter().map(|p| &p.ns))),
            )
    }

    /// Names of every namespace of this cluster.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.underlay.name().to_owned()];
        if let Some(ext) = &self.external {
            names.push(ext.ns.name().to_owned());
        }
        for node in &self.nodes {
            names.push(node.ns.name().to_owned());
            names.extend(node.pods.iter().map(|p| p.ns.name().to_owned()));
        }
        names
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.pods.clear();
        }
        self.nodes.clear();
        self.external = None;
        // `underlay` is dropped after this.
    }
}

// ---------------------------------------------------------------------------
// Traffic helpers
// ---------------------------------------------------------------------------

/// How long a [`TcpServer`] in reply mode waits for the client's line.
const REPLY_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// Poll interval of server loops checking for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The reply line of both servers: `"{name} {peer_ip}:{peer_port}"`.
pub fn reply_line(name: &str, peer: SocketAddr) -> String {
    // `SocketAddr`'s form: `ip:port`, `[ip6]:port`.
    format!("{name} {peer}\n")
}

/// Splits a reply line (with or without the trailing newline) into the server
/// name and the peer address the server saw.
pub fn parse_reply(line: &str) -> Option<(&str, SocketAddr)> {
    let (name, peer) = line.trim_end().rsplit_once(' ')?;
    Some((name, peer.parse().ok()?))
}

/// What a [`TcpServer`] does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpMode {
    /// Read up to one line (short timeout), write `"{name} {peer}\n"`, close.
    Reply,
    /// Read and discard until the peer closes (long-lived flows).
    Sink,
    /// Echo everything back until the peer closes.
    Echo,
}

struct Conn {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct ServerStats {
    served: AtomicU64,
    bytes: AtomicU64,
    peers: Mutex<Vec<SocketAddr>>,
}

impl ServerStats {
    fn record(&self, peer: SocketAddr) {
        lock(&self.peers).push(peer);
        self.served.fetch_add(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A TCP server living in a namespace; stops (listener closed, connections
/// shut down, threads joined) on drop.
pub struct TcpServer {
    name: String,
    mode: TcpMode,
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    conns: Arc<Mutex<Vec<Conn>>>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("local", &self.local)
            .field("served", &self.served())
            .finish()
    }
}

impl TcpServer {
    /// A [`TcpMode::Reply`] server named `name` listening on `bind` in `ns`.
    pub fn start(ns: &Netns, name: &str, bind: SocketAddr) -> Result<Self> {
        Self::start_mode(ns, name, bind, TcpMode::Reply)
    }

    /// A [`TcpMode::Sink`] server.
    pub fn start_sink(ns: &Netns, name: &str, bind: SocketAddr) -> Result<Self> {
        Self::start_mode(ns, name, bind, TcpMode::Sink)
    }

    /// A [`TcpMode::Echo`] server.
    pub fn start_echo(ns: &Netns, name: &str, bind: SocketAddr) -> Result<Self> {
        Self::start_mode(ns, name, bind, TcpMode::Echo)
    }

    /// A server in any mode. `bind` may use port 0; see [`TcpServer::local_addr`].
    pub fn start_mode(ns: &Netns, name: &str, bind: SocketAddr, mode: TcpMode) -> Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind(bind))?
            .with_context(|| format!("binding TCP {bind} in {}", ns.name()))?;
        let local = listener.local_addr().context("listener address")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (name, stop, stats, conns) =
                (name.to_owned(), stop.clone(), stats.clone(), conns.clone());
            std::thread::Builder::new()
                .name(format!("tcp-{name}"))
                .spawn(move || accept_loop(&listener, &name, mode, &stop, &stats, &conns))
                .context("spawning the accept thread")?
        };
        Ok(Self {
            name: name.to_owned(),
            mode,
            local,
            stop,
            stats,
            conns,
            accept: Some(accept),
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The name put in reply lines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted so far.
    pub fn served(&self) -> u64 {
        self.stats.served.load(Ordering::SeqCst)
    }

    /// Bytes received over all connections (sink and echo modes).
    pub fn bytes_received(&self) -> u64 {
        self.stats.bytes.load(Ordering::SeqCst)
    }

    /// Peer addresses of all accepted connections, in accept order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.stats.peers).clone()
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.conns)
            .iter()
            .filter(|c| !c.thread.is_finished())
            .count()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *lock(&self.conns));
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
fn poll_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    name: &str,
    mode: TcpMode,
    stop: &AtomicBool,
    stats: &Arc<ServerStats>,
    conns: &Mutex<Vec<Conn>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match poll_readable(listener.as_raw_fd(), POLL_INTERVAL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                continue;
            }
            // e.g. ECONNABORTED: the client went away before accept.
            Err(_) => continue,
        };
        stats.record(peer);
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let name = name.to_owned();
        let stats2 = stats.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tcp-{name}-conn"))
            .spawn(move || {
                let _ = serve_conn(stream, peer, &name, mode, &stats2);
            });
        let mut guard = lock(conns);
        guard.retain(|c| !c.thread.is_finished());
        if let Ok(thread) = spawned {
            guard.push(Conn {
                stream: clone,
                thread,
            });
        }
    }
}

fn serve_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    mode: TcpMode,
    stats: &ServerStats,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    match mode {
        TcpMode::Reply => {
            stream.set_read_timeout(Some(REPLY_READ_TIMEOUT))?;
            let mut line = Vec::new();
            let mut buf = [0u8; 512];
            while !line.contains(&b'\n') && line.len() < 4096 {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => line.extend_from_slice(&buf[..n]),
                    Err(_) => break, // timeout: the client may send nothing
                }
            }
            stream.write_all(reply_line(name, peer).as_bytes())?;
            // Half-close and wait for the client to close, so unread data
            // never turns our close into a RST.
            stream.shutdown(Shutdown::Write)?;
            stream.set_read_timeout(Some(REPLY_READ_TIMEOUT))?;
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            Ok(())
        }
        TcpMode::Sink | TcpMode::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                stats.bytes.fetch_add(n as u64, Ordering::SeqCst);
                if mode == TcpMode::Echo {
                    stream.write_all(&buf[..n])?;
                }
            }
        }
    }
}

/// A UDP server living in a namespace: answers each datagram with
/// `"{name} {peer_ip}:{peer_port}\n"` from the address the datagram was sent
/// to (`IP_PKTINFO`, so wildcard binds on multi-address hosts answer from the
/// right source). Stops on drop.
pub struct UdpServer {
    name: String,
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UdpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpServer")
            .field("name", &self.name)
            .field("local", &self.local)
            .field("served", &self.served())
            .finish()
    }
}

impl UdpServer {
    /// Starts the server named `name` on `bind` in `ns` (port 0 allowed).
    pub fn start(ns: &Netns, name: &str, bind: SocketAddr) -> Result<Self> {
        let socket = ns
            .run(|| UdpSocket::bind(bind))?
            .with_context(|| format!("binding UDP {bind} in {}", ns.name()))?;
        let local = socket.local_addr().context("UDP server address")?;
        socket
            .set_read_timeout(Some(POLL_INTERVAL))
            .context("setting the UDP read timeout")?;
        let pktinfo = local.is_ipv4() && local.ip().is_unspecified();
        if pktinfo {
            setsockopt_int(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
                .context("enabling IP_PKTINFO")?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let thread = {
            let (name, stop, stats) = (name.to_owned(), stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || udp_loop(&socket, &name, pktinfo, &stop, &stats))
                .context("spawning the UDP server thread")?
        };
        Ok(Self {
            name: name.to_owned(),
            local,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The name put in reply lines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Datagrams answered so far.
    pub fn served(&self) -> u64 {
        self.stats.served.load(Ordering::SeqCst)
    }

    /// Peer addresses of all datagrams, in arrival order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.stats.peers).clone()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn udp_loop(socket: &UdpSocket, name: &str, pktinfo: bool, stop: &AtomicBool, stats: &ServerStats) {
    // Room for a whole (reassembled) datagram.
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        let received = if pktinfo {
            recv_with_dst(socket.as_raw_fd(), &mut buf)
        } else {
            socket.recv_from(&mut buf).map(|(n, p)| (n, p, None))
        };
        let (_, peer, dst) = match received {
            Ok(x) => x,
            Err(_) => continue, // timeout (poll for stop) or a queued ICMP error
        };
        stats.record(peer);
        let reply = reply_line(name, peer);
        let sent = match (dst, peer) {
            (Some(src), SocketAddr::V4(to)) => {
                send_from(socket.as_raw_fd(), reply.as_bytes(), to, src)
            }
            _ => socket.send_to(reply.as_bytes(), peer).map(drop),
        };
        if sent.is_err() {
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    }
}

/// `setsockopt` with an int value.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: valid fd, pointer/length of a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            socklen::<libc::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `size_of::<T>()` as a `socklen_t`.
pub fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// A `sockaddr_in` for `a`.
pub fn sockaddr_v4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// `a` as a `sockaddr_storage` holding a `sockaddr_in` or `sockaddr_in6`,
/// with its length, for bind(2)/connect(2) of either family.
pub fn sockaddr_any(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = sockaddr_v4(v4);
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (storage, socklen::<libc::sockaddr_in>())
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (storage, socklen::<libc::sockaddr_in6>())
        }
    }
}

fn from_in_addr(a: libc::in_addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(a.s_addr))
}

/// `recvmsg` returning the datagram's destination address (IP_PKTINFO).
fn recv_with_dst(
    fd: RawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
    // SAFETY: all-zero is a valid sockaddr_in / msghdr.
    let mut addr: libc::sockaddr_in = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = socklen::<libc::sockaddr_in>();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    let peer = SocketAddr::V4(SocketAddrV4::new(
        from_in_addr(addr.sin_addr),
        u16::from_be(addr.sin_port),
    ));
    let mut dst = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc
    // CMSG helpers; data is read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                dst = Some(from_in_addr(info.ipi_addr));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n, peer, dst))
}

/// `sendmsg` with an IP_PKTINFO source address.
fn send_from(fd: RawFd, data: &[u8], to: SocketAddrV4, src: Ipv4Addr) -> std::io::Result<()> {
    let mut addr = sockaddr_v4(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = socklen::<libc::sockaddr_in>();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/LEN are pure computations; the control buffer
    // (64 bytes) is larger than CMSG_SPACE(sizeof in_pktinfo) (32 bytes).
    unsafe {
        let info_len = u32::try_from(size_of::<libc::in_pktinfo>()).unwrap_or(u32::MAX);
        msg.msg_controllen = libc::CMSG_SPACE(info_len) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        if cmsg.is_null() {
            return Err(std::io::Error::other("no room for IP_PKTINFO"));
        }
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(info_len) as usize;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(src).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
    }
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe { libc::sendmsg(fd, &raw const msg, 0) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Why a client request failed, with the time it took to fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// RST to the SYN / ICMP port unreachable.
    #[error("connection refused after {elapsed:?}")]
    Refused { elapsed: Duration },
    /// No answer within the timeout.
    #[error("timed out after {elapsed:?}")]
    TimedOut { elapsed: Duration },
    /// No route, or ICMP host/net unreachable (incl. admin prohibited).
    #[error("unreachable after {elapsed:?}: {reason}")]
    Unreachable { elapsed: Duration, reason: String },
    /// The connection was reset after it was established.
    #[error("connection reset after {elapsed:?}")]
    Reset { elapsed: Duration },
    /// A UDP reply came from `from`, not from the address the client sent to.
    #[error("reply from the wrong source {from} after {elapsed:?}")]
    WrongSource { from: SocketAddr, elapsed: Duration },
    /// Anything else.
    #[error("{reason} (after {elapsed:?})")]
    Other { reason: String, elapsed: Duration },
}

impl ClientError {
    /// Time from the start of the request to the failure.
    pub fn elapsed(&self) -> Duration {
        match self {
            Self::Refused { elapsed }
            | Self::TimedOut { elapsed }
            | Self::Unreachable { elapsed, .. }
            | Self::Reset { elapsed }
            | Self::WrongSource { elapsed, .. }
            | Self::Other { elapsed, .. } => *elapsed,
        }
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }

    pub fn is_timed_out(&self) -> bool {
        matches!(self, Self::TimedOut { .. })
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    fn from_io(e: &std::io::Error, started: Instant) -> Self {
        let elapsed = started.elapsed();
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => return Self::Refused { elapsed },
            Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => {
                return Self::TimedOut { elapsed };
            }
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EACCES | libc::EPERM) => {
                return Self::Unreachable {
                    elapsed,
                    reason: e.to_string(),
                };
            }
            Some(libc::ECONNRESET | libc::EPIPE) => return Self::Reset { elapsed },
            _ => {}
        }
        match e.kind() {
            ErrorKind::ConnectionRefused => Self::Refused { elapsed },
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Self::TimedOut { elapsed },
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Self::Unreachable {
                elapsed,
                reason: e.to_string(),
            },
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Self::Reset { elapsed },
            _ => Self::Other {
                reason: e.to_string(),
                elapsed,
            },
        }
    }

    fn other(reason: impl Into<String>, started: Instant) -> Self {
        Self::Other {
            reason: reason.into(),
            elapsed: started.elapsed(),
        }
    }
}

fn run_in<R: Send>(
    ns: &Netns,
    started: Instant,
    f: impl FnOnce() -> Result<R, ClientError> + Send,
) -> Result<R, ClientError> {
    ns.run(f)
        .map_err(|e| ClientError::other(format!("{e:#}"), started))?
}

/// Opens a TCP connection from inside `ns` (the socket stays in `ns`), for
/// long-lived flows. The returned stream has no read/write timeouts set.
pub fn tcp_connect(
    ns: &Netns,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let started = Instant::now();
    run_in(ns, started, || {
        TcpStream::connect_timeout(&to, timeout).map_err(|e| ClientError::from_io(&e, started))
    })
}

/// From inside `ns`: connects to `to`, sends `"hi\n"`, and returns the reply
/// line (without the newline). `timeout` bounds the whole exchange.
pub fn tcp_request(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<String, ClientError> {
    let started = Instant::now();
    run_in(ns, started, || {
        let io = |e: std::io::Error| ClientError::from_io(&e, started);
        let mut stream = TcpStream::connect_timeout(&to, timeout).map_err(io)?;
        let remaining = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(remaining)).map_err(io)?;
        stream.set_write_timeout(Some(remaining)).map_err(io)?;
        stream.write_all(b"hi\n").map_err(io)?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(io)?;
        if line.is_empty() {
            return Err(ClientError::other(
                "connection closed without a reply",
                started,
            ));
        }
        Ok(line.trim_end().to_owned())
    })
}

/// From inside `ns`: `GET path` over HTTP/1.1 (connection close); returns
/// the status line. For the agent's HTTP servers, which answer HTTP only.
pub fn http_get_status(
    ns: &Netns,
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, ClientError> {
    let started = Instant::now();
    run_in(ns, started, || {
        let io = |e: std::io::Error| ClientError::from_io(&e, started);
        let mut stream = TcpStream::connect_timeout(&to, timeout).map_err(io)?;
        let remaining = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(remaining)).map_err(io)?;
        stream.set_write_timeout(Some(remaining)).map_err(io)?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .map_err(io)?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(io)?;
        if line.is_empty() {
            return Err(ClientError::other(
                "connection closed without a reply",
                started,
            ));
        }
        Ok(line.trim_end().to_owned())
    })
}

/// From inside `ns`: sends one datagram to `to` from an unconnected socket
/// and waits for a reply, which must come from `to` itself
/// ([`ClientError::WrongSource`] otherwise). ICMP errors are reported via
/// `IP_RECVERR` ([`ClientError::Refused`] for port unreachable).
pub fn udp_request(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<String, ClientError> {
    udp_request_payload(ns, to, b"hi\n", timeout)
}

/// [`udp_request`] with a datagram of the caller's (larger than the MTU:
/// the sender fragments it).
pub fn udp_request_payload(
    ns: &Netns,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String, ClientError> {
    let started = Instant::now();
    run_in(ns, started, || {
        let io = |e: std::io::Error| ClientError::from_io(&e, started);
        let bind: SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).map_err(io)?;
        if to.is_ipv4() {
            setsockopt_int(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVERR, 1)
                .map_err(io)?;
        } else {
            setsockopt_int(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVERR,
                1,
            )
            .map_err(io)?;
        }
        socket.send_to(payload, to).map_err(io)?;
        let mut buf = [0u8; 2048];
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err(ClientError::TimedOut {
                elapsed: started.elapsed(),
            });
        }
        socket.set_read_timeout(Some(remaining)).map_err(io)?;
        let (n, from) = socket.recv_from(&mut buf).map_err(io)?;
        if from != to {
            return Err(ClientError::WrongSource {
                from,
                elapsed: started.elapsed(),
            });
        }
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
    })
}

static PING_SEQ: AtomicU16 = AtomicU16::new(1);

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

/// From inside `ns`: one ICMP echo to `dst` over a raw socket (no `ping`
/// binary needed). Returns the round-trip time.
pub fn ping(ns: &Netns, dst: Ipv4Addr, timeout: Duration) -> Result<Duration, ClientError> {
    let started = Instant::now();
    run_in(ns, started, || {
        let io = |e: std::io::Error| ClientError::from_io(&e, started);
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(0);
        let seq = PING_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut pkt = [0u8; 24];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        pkt[8..].copy_from_slice(b"proxy-tests ping");
        let csum = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&csum.to_be_bytes());
        let addr = sockaddr_v4(SocketAddrV4::new(dst, 0));
        // SAFETY: valid fd, buffer and sockaddr_in of the stated sizes.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const addr).cast(),
                socklen::<libc::sockaddr_in>(),
            )
        };
        if sent < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let mut buf = [0u8; 1500];
        loop {
            let remaining = timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() || !poll_readable(sock.as_raw_fd(), remaining).map_err(io)? {
                return Err(ClientError::TimedOut {
                    elapsed: started.elapsed(),
                });
            }
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| io(std::io::Error::last_os_error()))?;
            match classify_icmp(&buf[..n], dst, id, seq) {
                Some(IcmpMatch::Reply) => return Ok(started.elapsed()),
                Some(IcmpMatch::Unreachable(code)) => {
                    return Err(ClientError::Unreachable {
                        elapsed: started.elapsed(),
                        reason: format!("ICMP destination unreachable (code {code})"),
                    });
                }
                None => {}
            }
        }
    })
}

enum IcmpMatch {
    Reply,
    Unreachable(u8),
}

/// Looks at a raw IPv4+ICMP packet for the answer to our echo `id`/`seq`.
fn classify_icmp(pkt: &[u8], dst: Ipv4Addr, id: u16, seq: u16) -> Option<IcmpMatch> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(*pkt.get(12)?, *pkt.get(13)?, *pkt.get(14)?, *pkt.get(15)?);
    let icmp = pkt.get(ihl..)?;
    let ours = |echo: &[u8]| -> Option<bool> {
        Some(echo.get(4..6)? == id.to_be_bytes() && echo.get(6..8)? == seq.to_be_bytes())
    };
    match *icmp.first()? {
        0 if src == dst && ours(icmp)? => Some(IcmpMatch::Reply),
        3 => {
            let inner = icmp.get(8..)?;
            let inner_ihl = usize::from(inner.first()? & 0x0f) * 4;
            let echo = inner.get(inner_ihl..)?;
            (*echo.first()? == 8 && ours(echo)?).then_some(IcmpMatch::Unreachable(*icmp.get(1)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::list_namespaces;

    const T: Duration = Duration::from_secs(3);

    fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    }

    fn any(port: u16) -> SocketAddr {
        sa(Ipv4Addr::UNSPECIFIED, port)
    }

    #[test]
    fn helpers() {
        assert_eq!(node_ip(1), Ipv4Addr::new(172, 18, 0, 11));
        assert_eq!(pod_ip(2, 3), Ipv4Addr::new(10, 244, 2, 4));
        assert_eq!(pod_cidr(2), "10.244.2.0/24");
        let v = host_veth_name("pod-1-1");
        assert!(v.starts_with("veth") && v.len() == 12, "{v}");
        assert_ne!(v, host_veth_name("pod-1-2"));
        let line = reply_line("web", sa(Ipv4Addr::new(10, 244, 1, 2), 4000));
        assert_eq!(line, "web 10.244.1.2:4000\n");
        assert_eq!(
            parse_reply(&line),
            Some(("web", sa(Ipv4Addr::new(10, 244, 1, 2), 4000)))
        );
        // Checksum of a packet that includes its own checksum is zero.
        let mut pkt = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'b', b'c'];
        let c = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(icmp_checksum(&pkt), 0);
    }

    #[test]
    fn cluster_layout_and_connectivity() {
        let t0 = Instant::now();
        let cluster = Cluster::new(ClusterSpec::default()).expect("build cluster");
        eprintln!("cluster build took {:?}", t0.elapsed());

        // Nothing leaks into the root namespace.
        let root_links =
            crate::netns::run_cmd(std::process::Command::new("ip").args(["-o", "link"]))
                .expect("ip link");
        for pod in cluster.pods() {
            assert!(!root_links.contains(&pod.host_veth), "{root_links}");
        }

        let p11 = cluster.pod(1, 1);
        let p12 = cluster.pod(1, 2);
        let p21 = cluster.pod(2, 1);
        assert_eq!(p12.ip, Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(p21.node_name, "node2");
        let routes = cluster.node(1).ns.ip(&["route"]).expect("routes");
        assert!(
            routes.contains(&format!("10.244.1.3 dev {} scope link", p12.host_veth)),
            "{routes}"
        );
        assert!(
            routes.contains("10.244.2.0/24 via 172.18.0.12 dev eth0"),
            "{routes}"
        );
        let proute = p11.ns.ip(&["route"]).expect("pod routes");
        assert!(
            proute.contains("default via 10.244.1.1 dev eth0"),
            "{proute}"
        );

        let servers: Vec<TcpServer> = cluster
            .pods()
            .map(|p| TcpServer::start(&p.ns, &p.name, any(8080)).expect("server"))
            .collect();

        // pod -> pod, same node: the server sees the real pod source IP.
        let r = tcp_request(&p11.ns, sa(p12.ip, 8080), T).expect("same node");
        let (name, peer) = parse_reply(&r).expect("parse");
        assert_eq!((name, peer.ip()), ("pod-1-2", p11.ip.into()), "{r}");

        // pod -> pod across nodes, both directions.
        let r = tcp_request(&p11.ns, sa(p21.ip, 8080), T).expect("cross node");
        let (name, peer) = parse_reply(&r).expect("parse");
        assert_eq!((name, peer.ip()), ("pod-2-1", p11.ip.into()), "{r}");
        let r = tcp_request(&p21.ns, sa(p12.ip, 8080), T).expect("cross node back");
        assert_eq!(parse_reply(&r).expect("parse").1.ip(), p21.ip);

        // node -> pod and pod -> node.
        let r = tcp_request(&cluster.node(2).ns, sa(p21.ip, 8080), T).expect("node->pod");
        assert!(r.starts_with("pod-2-1 "), "{r}");
        let node_srv = TcpServer::start(&cluster.node(1).ns, "node1", any(9090)).expect("node srv");
        let r = tcp_request(&p21.ns, sa(node_ip(1), 9090), T).expect("pod->node");
        assert_eq!(
            r,
            format!(
                "node1 {}:{}",
                p21.ip,
                parse_reply(&r).expect("parse").1.port()
            )
        );

        // external -> node underlay IP.
        let ext = cluster.external();
        for node in cluster.nodes() {
            ping(&ext.ns, node.underlay_ip, T).expect("ping node from external");
        }
        let r = tcp_request(&ext.ns, sa(node_ip(1), 9090), T).expect("external->node");
        assert!(r.starts_with(&format!("node1 {}:", ext.ip)), "{r}");
        // The external client has no route to pods until told so.
        let e = tcp_request(&ext.ns, sa(p11.ip, 8080), T).expect_err("no route");
        assert!(e.is_unreachable(), "{e:?}");
        ext.add_route(POD_NETWORK, node_ip(1)).expect("route");
        let r = tcp_request(&ext.ns, sa(p21.ip, 8080), T).expect("external->pod via node1");
        assert!(r.starts_with(&format!("pod-2-1 {}:", ext.ip)), "{r}");

        // Many requests in a row are cheap.
        let t = Instant::now();
        for _ in 0..100 {
            tcp_request(&p11.ns, sa(p21.ip, 8080), T).expect("repeat");
        }
        eprintln!("100 tcp requests took {:?}", t.elapsed());
        let p21_srv = &servers[2];
        assert_eq!(p21_srv.name(), "pod-2-1");
        assert_eq!(p21_srv.served(), 103);

        // Refused comes back fast.
        let e = tcp_request(&p11.ns, sa(p21.ip, 1), T).expect_err("refused");
        assert!(e.is_refused(), "{e:?}");
        assert!(e.elapsed() < Duration::from_millis(500), "{e:?}");

        // Node2 has no route for an unused IP of its pod CIDR: ICMP net
        // unreachable comes back.
        let e = tcp_request(&p11.ns, sa(Ipv4Addr::new(10, 244, 2, 200), 80), T)
            .expect_err("unreachable");
        assert!(e.is_unreachable(), "{e:?}");
        // Timeout: nobody answers ARP for this underlay address.
        let short = Duration::from_millis(300);
        let e = tcp_request(&p11.ns, sa(Ipv4Addr::new(172, 18, 0, 200), 80), short)
            .expect_err("timeout");
        assert!(e.is_timed_out(), "{e:?}");
        assert!(e.elapsed() >= short && e.elapsed() < short * 3, "{e:?}");
        drop(node_srv);
    }

    #[test]
    fn udp_and_long_lived_flows() {
        let cluster = Cluster::new(ClusterSpec {
            nodes: 2,
            pods_per_node: 1,
            external_client: true,
        })
        .expect("cluster");
        let p11 = cluster.pod(1, 1);
        let p21 = cluster.pod(2, 1);
        let srv = UdpServer::start(&p21.ns, "udp-2-1", any(5353)).expect("udp server");
        let t = Instant::now();
        for _ in 0..50 {
            let r = udp_request(&p11.ns, sa(p21.ip, 5353), T).expect("udp");
            let (name, peer) = parse_reply(&r).expect("parse");
            assert_eq!((name, peer.ip()), ("udp-2-1", p11.ip.into()));
        }
        eprintln!("50 udp requests took {:?}", t.elapsed());
        assert_eq!(srv.served(), 50);
        let e = udp_request(&p11.ns, sa(p21.ip, 5354), T).expect_err("refused");
        assert!(e.is_refused(), "{e:?}");

        // A wildcard-bound server on a node answers from the address that was
        // asked (the node has 172.18.0.x and 10.244.x.1): pod -> node IP.
        let node_srv = UdpServer::start(&cluster.node(2).ns, "node2", any(5353)).expect("srv");
        let r = udp_request(&p21.ns, sa(node_ip(2), 5353), T).expect("pod->own node");
        assert!(r.starts_with(&format!("node2 {}:", p21.ip)), "{r}");
        let r = udp_request(&cluster.external().ns, sa(node_ip(2), 5353), T).expect("ext->node");
        assert!(r.starts_with("node2 172.18.0.100:"), "{r}");
        drop(node_srv);

        // A wildcard-bound socket without IP_PKTINFO answers a pod -> own
        // node request from the veth's 10.244.2.1: the client flags that.
        let naive = cluster
            .node(2)
            .ns
            .run(|| UdpSocket::bind(any(5400)))
            .expect("run")
            .expect("bind");
        let responder = std::thread::spawn(move || -> std::io::Result<()> {
            naive.set_read_timeout(Some(T))?;
            let mut b = [0u8; 64];
            let (_, peer) = naive.recv_from(&mut b)?;
            naive.send_to(b"naive\n", peer)?;
            Ok(())
        });
        let e = udp_request(&p21.ns, sa(node_ip(2), 5400), T).expect_err("wrong source");
        assert!(
            matches!(e, ClientError::WrongSource { from, .. } if from == sa(gateway_ip(2), 5400)),
            "{e:?}"
        );
        responder.join().expect("join").expect("responder");

        // Sink and echo.
        let sink = TcpServer::start_sink(&p21.ns, "sink", any(7000)).expect("sink");
        let mut s = tcp_connect(&p11.ns, sa(p21.ip, 7000), T).expect("connect sink");
        s.write_all(&[7u8; 100_000]).expect("write");
        let deadline = Instant::now() + T;
        while sink.bytes_received() < 100_000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sink.bytes_received(), 100_000);
        assert_eq!(sink.open_connections(), 1);
        assert_eq!(sink.peers()[0].ip(), p11.ip);
        let echo = TcpServer::start_echo(&p21.ns, "echo", any(7001)).expect("echo");
        let mut e = tcp_connect(&p11.ns, sa(p21.ip, 7001), T).expect("connect echo");
        e.set_read_timeout(Some(T)).expect("timeout");
        e.write_all(b"ping-pong").expect("write");
        let mut back = [0u8; 9];
        e.read_exact(&mut back).expect("read echo");
        assert_eq!(&back, b"ping-pong");
        // Dropping the servers closes the open connections.
        drop(sink);
        s.set_read_timeout(Some(T)).expect("timeout");
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
        drop(echo);
    }

    #[test]
    fn tx_checksum_toggle() {
        let cluster = Cluster::new(ClusterSpec {
            nodes: 1,
            pods_per_node: 1,
            external_client: false,
        })
        .expect("cluster");
        let pod = cluster.pod(1, 1);
        match pod.set_tx_checksum(false) {
            Ok(()) => {
                let k = pod.ns.exec(&["ethtool", "-k", "eth0"]).expect("ethtool -k");
                assert!(k.contains("tx-checksumming: off"), "{k}");
                pod.set_tx_checksum(true).expect("back on");
            }
            Err(e) => assert!(format!("{e:#}").contains("ethtool"), "{e:#}"),
        }
        assert!(cluster.try_external().is_none());
    }

    #[test]
    fn namespaces_are_deleted_on_drop_and_panic() {
        let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
        let names = cluster.namespace_names();
        assert_eq!(names.len(), 8);
        drop(cluster);
        let left = list_namespaces().expect("list");
        assert!(
            names.iter().all(|n| !left.contains(n)),
            "{names:?} vs {left:?}"
        );

        let captured = Mutex::new(Vec::new());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
            lock(&captured).extend(cluster.namespace_names());
            panic!("test failure inside a cluster");
        }));
        assert!(r.is_err());
        let names = lock(&captured).clone();
        assert_eq!(names.len(), 8);
        let left = list_namespaces().expect("list");
        assert!(
            names.iter().all(|n| !left.contains(n)),
            "{names:?} vs {left:?}"
        );
    }

    #[test]
    fn bad_specs_are_rejected() {
        let e = Cluster::new(ClusterSpec {
            nodes: 0,
            ..ClusterSpec::default()
        })
        .expect_err("zero nodes");
        assert!(format!("{e}").contains("nodes"));
    }
}
