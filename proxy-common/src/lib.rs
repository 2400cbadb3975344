//! Map keys, values, names and limits shared by the kernel side
//! (`proxy-ebpf`) and userspace (`proxy`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields instead, always written as zero) and has its size asserted at
//! compile time, so both sides agree byte for byte.
//!
//! Byte order: IPv4 addresses and L4 ports are kept in **network byte order**
//! exactly as they appear in packets (an address is
//! `u32::from_ne_bytes(ip.octets())`, a port is `port.to_be()`); an IPv6
//! address is an [`Ip6`], its 16 octets as four such words; every other
//! integer is in host byte order. The `user` feature adds conversions.
//!
//! The maps keyed or valued by an address come once per family (`_V4`,
//! `_V6`; source ranges and Maglev tables are IPv4 only); maps
//! keyed by ids (slots, Maglev tables, affinity membership,
//! statistics) are shared: frontend and backend ids are one space across
//! both families.
#![no_std]

/// Version of the key/value layouts below. Bumped whenever a layout changes;
/// pinned maps of another version are not reused (the agent pins under a
/// directory carrying this number).
pub const LAYOUT_VERSION: u32 = 11;

/// How the kernel stores a map ([`MapDef::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    PerCpuHash,
    Array,
    PerCpuArray,
    LpmTrie,
}

/// One map, described once: its pinned name, how the kernel stores it, its
/// key and value types (`K`, `V`) and its default capacity. The kernel
/// declares its statics from these (`proxy-ebpf`'s `maps.rs`), and the
/// agent loads, adopts, sizes, dumps and counts every map from
/// [`maps::ALL`].
pub struct MapDef<K, V> {
    /// Name, also the file name under the pin directory. At most 15 bytes:
    /// the kernel truncates map names to `BPF_OBJ_NAME_LEN - 1`.
    pub name: &'static str,
    pub kind: MapKind,
    /// Default `max_entries` (the agent may override it at load time).
    pub max_entries: u32,
    /// `map_flags` (`BPF_F_NO_PREALLOC` ...).
    pub flags: u32,
    /// One line on what an entry is, for docs and `proxyctl`.
    pub doc: &'static str,
    _types: core::marker::PhantomData<(K, V)>,
}

impl<K, V> MapDef<K, V> {
    pub const fn new(
        name: &'static str,
        kind: MapKind,
        max_entries: u32,
        flags: u32,
        doc: &'static str,
    ) -> Self {
        assert!(
            name.len() <= 15,
            "map name longer than BPF_OBJ_NAME_LEN - 1"
        );
        MapDef {
            name,
            kind,
            max_entries,
            flags,
            doc,
            _types: core::marker::PhantomData,
        }
    }

    /// The untyped description, for code that walks every map.
    pub const fn info(&self) -> MapInfo {
        MapInfo {
            name: self.name,
            kind: self.kind,
            max_entries: self.max_entries,
            flags: self.flags,
            doc: self.doc,
            key_size: core::mem::size_of::<K>() as u32,
            value_size: core::mem::size_of::<V>() as u32,
        }
    }
}

/// [`MapDef`] without its types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub name: &'static str,
    pub kind: MapKind,
    pub max_entries: u32,
    pub flags: u32,
    pub doc: &'static str,
    pub key_size: u32,
    pub value_size: u32,
}

/// `const` string equality (the kernel side asserts its `#[map(name)]`
/// literals against the descriptors with it).
pub const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `BPF_F_NO_PREALLOC`: entries are allocated on insert.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Every map: the one place that lists them.
pub mod maps {
    use super::*;

    pub const SERVICES: MapDef<ServiceKey, ServiceValue> = MapDef::new(
        "SVC_V4",
        MapKind::Hash,
        65_536,
        0,
        "frontend (addr, port, proto) -> id, backend count, live slot generation, kind flags, Maglev table",
    );
    pub const SLOTS: MapDef<SlotKey, u32> = MapDef::new(
        "SLOTS_V4",
        MapKind::Hash,
        262_144,
        0,
        "(frontend id, generation, index) -> backend id",
    );
    pub const BACKENDS: MapDef<u32, Backend> = MapDef::new(
        "BACKENDS_V4",
        MapKind::Hash,
        262_144,
        0,
        "backend id -> addr, port, proto, flags (local, terminating)",
    );
    pub const REVNAT: MapDef<u32, RevNat> = MapDef::new(
        "REVNAT_V4",
        MapKind::Hash,
        65_536,
        0,
        "frontend id -> frontend addr, port (what replies must carry)",
    );
    pub const CONNTRACK: MapDef<CtKey, CtValue> = MapDef::new(
        "CT_V4",
        MapKind::LruHash,
        262_144,
        0,
        "(saddr, daddr, sport, dport, proto, direction) -> backend id, frontend id, last seen, TCP flags, NAT",
    );
    pub const AFFINITY: MapDef<AffinityKey, AffinityValue> = MapDef::new(
        "AFFINITY_V4",
        MapKind::LruHash,
        65_536,
        0,
        "(client netns cookie or client IP, frontend id) -> backend id, last used",
    );
    pub const AFFINITY_MATCH: MapDef<AffinityMatchKey, u8> = MapDef::new(
        "AFF_MATCH_V4",
        MapKind::Hash,
        262_144,
        0,
        "(frontend id, backend id) -> 1 while the backend is in the frontend's live set (affinity check)",
    );
    pub const SOCK_REVNAT: MapDef<SockRevNatKey, SockRevNatValue> = MapDef::new(
        "SOCK_RNAT_V4",
        MapKind::LruHash,
        65_536,
        0,
        "(socket cookie, backend addr, port) -> frontend addr, port, id (socket LB reverse)",
    );
    pub const SVC_STATS: MapDef<u32, SvcStats> = MapDef::new(
        "SVC_STATS",
        MapKind::PerCpuHash,
        65_536,
        0,
        "frontend id -> packets, bytes (per CPU)",
    );
    pub const CONFIG: MapDef<u32, Config> = MapDef::new(
        "CONFIG",
        MapKind::Array,
        1,
        0,
        "0 -> node address for north-south SNAT and DSR, flags",
    );
    pub const SOURCE_RANGES: MapDef<SourceRangeKey, u8> = MapDef::new(
        "SRC_RANGES_V4",
        MapKind::LpmTrie,
        16_384,
        0, // LPM tries are always BPF_F_NO_PREALLOC (the loaders add it)
        "(frontend id, client network) -> 1: the clients a guarded frontend serves",
    );
    pub const MAGLEV: MapDef<MaglevKey, u32> = MapDef::new(
        "MAGLEV_V4",
        MapKind::Hash,
        1 << 22,
        BPF_F_NO_PREALLOC,
        "(Maglev table id, slot) -> backend id; one table per distinct (backends, size)",
    );
    pub const FRAGMENTS: MapDef<FragKey, FragValue> = MapDef::new(
        "FRAGS_V4",
        MapKind::LruHash,
        8_192,
        0,
        "(saddr, daddr, IP id, proto) of a fragmented datagram -> its ports (from the first fragment)",
    );
    pub const REPLY_DSTS: MapDef<u32, u8> = MapDef::new(
        "REPLY_DSTS",
        MapKind::Array,
        super::REPLY_DSTS_SLOTS,
        0,
        "reply_dst_slot(address) -> 1 once a conntrack reply entry was addressed there (tc_to_pod / tc_to_netdev look conntrack up only then)",
    );
    pub const SERVICES6: MapDef<ServiceKey6, ServiceValue> = MapDef::new(
        "SVC_V6",
        MapKind::Hash,
        65_536,
        BPF_F_NO_PREALLOC,
        "IPv6 frontend (addr, port, proto) -> as SVC_V4 (ids shared with it)",
    );
    pub const BACKENDS6: MapDef<u32, Backend6> = MapDef::new(
        "BACKENDS_V6",
        MapKind::Hash,
        262_144,
        BPF_F_NO_PREALLOC,
        "IPv6 backend id -> addr, port, proto, flags (ids shared with BACKENDS_V4)",
    );
    pub const SOCK_REVNAT6: MapDef<SockRevNatKey6, SockRevNatValue6> = MapDef::new(
        "SOCK_RNAT_V6",
        MapKind::LruHash,
        65_536,
        0,
        "(socket cookie, IPv6 backend addr, port) -> frontend addr, port, id (socket LB reverse)",
    );
    pub const CONNTRACK6: MapDef<CtKey6, CtValue> = MapDef::new(
        "CT_V6",
        MapKind::LruHash,
        262_144,
        0,
        "IPv6 (saddr, daddr, sport, dport, proto, direction) -> as CT_V4 (per-packet east-west flows; no NAT address)",
    );
    pub const REVNAT6: MapDef<u32, RevNat6> = MapDef::new(
        "REVNAT_V6",
        MapKind::Hash,
        65_536,
        BPF_F_NO_PREALLOC,
        "IPv6 frontend id -> frontend addr, port (what replies must carry)",
    );
    pub const AFFINITY6: MapDef<AffinityKey6, AffinityValue> = MapDef::new(
        "AFFINITY_V6",
        MapKind::LruHash,
        65_536,
        0,
        "(IPv6 client IP, frontend id) -> backend id, last used (per-packet path)",
    );
    pub const FRAGMENTS6: MapDef<FragKey6, FragValue> = MapDef::new(
        "FRAGS_V6",
        MapKind::LruHash,
        8_192,
        0,
        "(IPv6 saddr, daddr, fragment id, proto) of a fragmented datagram -> its ports (from the first fragment)",
    );
    pub const STATS: MapDef<u32, u64> = MapDef::new(
        "STATS",
        MapKind::PerCpuArray,
        stat::COUNT,
        0,
        "counter index -> count (per CPU): packets, translations, rejects, drops and passes by reason",
    );

    /// Every map, in the order `proxyctl dump-maps` prints them.
    pub const ALL: [MapInfo; 22] = [
        SERVICES.info(),
        SLOTS.info(),
        BACKENDS.info(),
        REVNAT.info(),
        CONNTRACK.info(),
        AFFINITY.info(),
        AFFINITY_MATCH.info(),
        SOCK_REVNAT.info(),
        SVC_STATS.info(),
        CONFIG.info(),
        SOURCE_RANGES.info(),
        MAGLEV.info(),
        FRAGMENTS.info(),
        REPLY_DSTS.info(),
        SERVICES6.info(),
        BACKENDS6.info(),
        SOCK_REVNAT6.info(),
        CONNTRACK6.info(),
        REVNAT6.info(),
        AFFINITY6.info(),
        FRAGMENTS6.info(),
        STATS.info(),
    ];
}

/// Program names (the functions in `proxy-ebpf`).
pub mod progs {
    /// tc ingress on a pod's host-side interface: packets leaving the pod.
    pub const TC_FROM_POD: &str = "tc_from_pod";
    /// tc egress on a pod's host-side interface: packets entering the pod.
    pub const TC_TO_POD: &str = "tc_to_pod";
    /// cgroup connect4: translate a frontend to a backend at connect().
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup sendmsg4: the same for unconnected UDP sends.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup recvmsg4: replies on such sockets appear to come from the frontend.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup getpeername4: a connected socket's peer is the frontend.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// tc ingress on the node's external interfaces (remote-backend
    /// north-south flows and their replies).
    pub const TC_FROM_NETDEV: &str = "tc_from_netdev";
    /// tc egress on the node's external interfaces (replies of local
    /// backends to north-south clients).
    pub const TC_TO_NETDEV: &str = "tc_to_netdev";
    /// XDP on the node's external interfaces: NodePort, ExternalIP and
    /// LoadBalancer traffic from outside, and its replies.
    pub const XDP_NODEPORT: &str = "xdp_nodeport";
    /// cgroup connect6: connect4's translation for IPv6 sockets (and for
    /// IPv4-mapped addresses on them, through the IPv4 maps).
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    /// cgroup sendmsg6.
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    /// cgroup recvmsg6.
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    /// cgroup getpeername6.
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
    /// cgroup sock_release: forget a closing socket's socket-LB reverse
    /// entry.
    pub const SOCK_RELEASE: &str = "sock_release";
}

/// Source address the per-packet path uses for hairpin traffic (a pod
/// reaching itself through a service), as Cilium's `IPV4_LOOPBACK`: replies
/// to it come back through the pod's host interface, where they are
/// translated back.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// [`HAIRPIN_ADDR`]'s IPv6 twin, `fd00:a9fe:2a01::1`: a unique local
/// address (RFC 4193, `fd00::/8`) whose bytes after the prefix repeat the
/// IPv4 one (169.254.42.1), not expected to be assigned in a cluster. A
/// pod's replies to it leave by its default route, through its host
/// interface, where they are translated back.
pub const HAIRPIN_ADDR6: [u8; 16] = [
    0xfd, 0, 0xa9, 0xfe, 0x2a, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

/// Conntrack idle timeouts (seconds), applied by the agent's GC.
pub mod ct_timeout {
    /// TCP after the handshake.
    pub const TCP_ESTABLISHED: u64 = 21_600;
    /// TCP that has seen only a SYN.
    pub const TCP_SYN: u64 = 60;
    /// TCP that has seen FIN or RST.
    pub const TCP_CLOSING: u64 = 10;
    /// UDP and anything else.
    pub const OTHER: u64 = 60;
}

/// Upper bound on backends per frontend (slot indices are `u16`). Map
/// capacities are not constants: each descriptor in [`maps`] carries a
/// default, and the agent sets `max_entries` at load time from its flags
/// (or from the cluster's size).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 65_535;

/// IP protocol numbers used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// A frontend: a service address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// L4 port, network byte order.
    pub port: u16,
    /// IP protocol number ([`proto`]).
    pub proto: u8,
    /// Reserved for traffic-policy scopes; always 0 for now.
    pub scope: u8,
}

/// `ServiceValue::flags` bits: what kind of frontend this is.
pub mod svc_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const EXTERNAL_IP: u16 = 1 << 2;
    pub const LOAD_BALANCER: u16 = 1 << 3;
    /// Only clients in the frontend's `SOURCE_RANGES` entries are served
    /// (`loadBalancerSourceRanges`); others are dropped.
    pub const SOURCE_RANGES: u16 = 1 << 4;
    /// The service's traffic policy for this kind of frontend is `Local`
    /// (`internalTrafficPolicy` for ClusterIP, `externalTrafficPolicy` for
    /// the others): the backends are this node's endpoints only. The data
    /// path does not read it; it lets `proxyctl explain` tell "no
    /// endpoints" from "no endpoint on this node" when the count is 0.
    pub const LOCAL_ONLY: u16 = 1 << 5;

    /// The kind bits by the Kubernetes name of the frontend kind (first
    /// match wins; none set reads as ClusterIP).
    pub const KIND_NAMES: [(u16, &str); 4] = [
        (NODE_PORT, "NodePort"),
        (EXTERNAL_IP, "ExternalIP"),
        (LOAD_BALANCER, "LoadBalancer"),
        (CLUSTER_IP, "ClusterIP"),
    ];
    /// The other bits, as `proxyctl` prints them.
    pub const OTHER_NAMES: [(u16, &str); 2] =
        [(SOURCE_RANGES, "source-ranges"), (LOCAL_ONLY, "local-only")];
}

/// The data part of a [`maps::SOURCE_RANGES`] LPM key. The LPM prefix
/// length is 32 (the whole frontend id) + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// [`ServiceValue::id`], big-endian so the trie's bit order covers it
    /// first, whole.
    pub service_id_be: u32,
    /// Client network, network byte order.
    pub addr: u32,
}

/// A fragmented IPv4 datagram, as its fragments carry it on the wire at the
/// hook that records it: [`maps::FRAGMENTS`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    /// IPv4 identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A fragmented IPv6 datagram, as its fragments carry it at the hook that
/// records it: [`maps::FRAGMENTS6`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: Ip6,
    pub daddr: Ip6,
    /// Fragment header identification, network byte order.
    pub id: u32,
    /// The upper-layer protocol (TCP, UDP).
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The L4 ports of a fragmented datagram (from its first fragment), as on
/// the wire before translation: network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

/// What a frontend resolves to. Replaced as a whole (one map update) to switch
/// between backend sets: see [`SlotKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Frontend id: keys the slots and the rev-NAT entry. Unique per
    /// frontend, never reused while the frontend exists.
    pub id: u32,
    /// Number of backend slots in the live generation (0: no endpoints).
    pub count: u16,
    /// Which slot generation (0 or 1) is live.
    pub generation: u8,
    pub _pad0: u8,
    /// [`svc_flags`] bits.
    pub flags: u16,
    pub _pad1: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0: no affinity.
    pub affinity_timeout: u32,
    /// Maglev table size `M` of this frontend (north-south frontends);
    /// 0: random selection from the slots.
    pub maglev_size: u32,
    /// [`MaglevKey::table_id`] of the frontend's Maglev table (valid when
    /// `maglev_size != 0`). Frontends with the same backends and size share
    /// one table.
    pub maglev_table: u32,
}

/// A Maglev table slot: [`maps::MAGLEV`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    /// Table id ([`ServiceValue::maglev_table`]), owned by the agent: one
    /// table per distinct (backend list, size), shared by the frontends
    /// that use it and deleted with the last of them.
    pub table_id: u32,
    /// `flow_hash % M`.
    pub slot: u32,
}

/// Seed of the Maglev flow hash (MurmurHash3 x86_32 over saddr, daddr,
/// sport, dport as on the wire, then the protocol byte): the kernel and
/// `proxy::maglev::flow_hash` must agree.
pub const MAGLEV_FLOW_SEED: u32 = 0x666c_6f77;

/// Index into a frontend's backend list.
///
/// Updates are never half-visible: the agent writes the new list under the
/// generation that is *not* live, then replaces the [`ServiceValue`] (new
/// count and generation in one update), then deletes the old generation's
/// slots. A packet reads the service value once and then only slots of that
/// generation, so it sees the old set or the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// [`ServiceValue::id`].
    pub service_id: u32,
    /// 0 or 1.
    pub generation: u16,
    /// 0-based slot, less than the [`ServiceValue::count`] of that generation.
    pub index: u16,
}

/// [`maps::AFFINITY_MATCH`] key: backend `backend_id` is in the live
/// backend set of frontend `service_id`. The affinity check is one lookup
/// for any service size; the agent writes an entry with the slots and
/// deletes it when the backend leaves the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub service_id: u32,
    pub backend_id: u32,
}

/// Session affinity: which backend a client was last sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// Socket path: the client's network namespace cookie (0 on the
    /// per-packet path).
    pub client_netns: u64,
    /// Per-packet path: the client's IPv4 address, network byte order (0 on
    /// the socket path).
    pub client_addr: u32,
    pub service_id: u32,
}

/// [`maps::AFFINITY6`] key: [`AffinityKey`] of an IPv6 client on the
/// per-packet path (the socket path keys by netns cookie in `AFFINITY_V4`
/// for both families).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey6 {
    pub client_addr: Ip6,
    pub service_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` when last used.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Socket-LB reverse translation key: a socket and the backend it was
/// pointed at.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()`.
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatValue {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// Per-frontend traffic counters (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    /// Packets translated (per-packet path) or connections/sends
    /// translated (socket path).
    pub packets: u64,
    /// Bytes of translated packets (per-packet path only).
    pub bytes: u64,
}

/// `Backend::flags` bits.
pub mod backend_flags {
    /// Serving but terminating (used only when nothing is ready).
    pub const TERMINATING: u8 = 1 << 0;
    /// On this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// A backend (endpoint address and target port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
}

/// The frontend address that replies from a backend are rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// L4 port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// An IPv6 address: its 16 octets as four words, each in network byte
/// order (`u32::from_ne_bytes` of four octets), as `bpf_sock_addr.user_ip6`
/// and the IPv6 header hold it.
pub type Ip6 = [u32; 4];

/// An IPv6 frontend: [`maps::SERVICES6`] key, [`ServiceKey`]'s fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub addr: Ip6,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// An IPv6 backend: [`maps::BACKENDS6`] value, [`Backend`]'s fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    pub addr: Ip6,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// [`backend_flags`] bits.
    pub flags: u8,
}

/// [`maps::SOCK_REVNAT6`] key: a socket and the IPv6 backend its
/// connect()/sendmsg() was pointed at.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey6 {
    pub cookie: u64,
    pub addr: Ip6,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

/// [`maps::SOCK_REVNAT6`] value: the frontend that backend stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatValue6 {
    pub addr: Ip6,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}

/// [`maps::REVNAT6`] value: [`RevNat`] for an IPv6 frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNat6 {
    pub addr: Ip6,
    /// L4 port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// [`maps::CONNTRACK6`] key: [`CtKey`] for IPv6 (addresses as [`Ip6`],
/// ports in network byte order). Its value is a [`CtValue`] whose
/// `nat_addr`/`nat_port` stay 0: IPv6 flows are east-west only (no SNAT,
/// no DSR).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: Ip6,
    pub daddr: Ip6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`ct_dir`].
    pub dir: u8,
    pub _pad: u16,
}

/// Conntrack key: the packet's own tuple plus the direction it was seen in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// [`ct_dir`].
    pub dir: u8,
    pub _pad: u16,
}

/// [`CtKey::dir`] values.
pub mod ct_dir {
    /// Client -> frontend, before translation. Remembers the chosen backend.
    pub const SERVICE: u8 = 0;
    /// Backend -> client, as the reply leaves the backend. Remembers the
    /// frontend to restore as the reply's source.
    pub const REPLY: u8 = 1;
}

/// Conntrack value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_seen_ns: u64,
    /// Chosen backend (SERVICE entries).
    pub backend_id: u32,
    /// Frontend id: rev-NAT entry for REPLY entries, owning frontend for both.
    pub service_id: u32,
    /// [`ct_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
    /// SNATed flows: on the SERVICE entry the address/port the client was
    /// rewritten to; on the REPLY entry the client's own address/port to
    /// restore. Network byte order; 0 when not SNATed.
    pub nat_addr: u32,
    pub nat_port: u16,
    pub _pad2: u16,
}

/// [`CtValue::flags`] bits.
pub mod ct_flags {
    pub const TCP_SYN: u32 = 1 << 0;
    pub const TCP_FIN: u32 = 1 << 1;
    pub const TCP_RST: u32 = 1 << 2;
    /// Seen a packet without SYN after the SYN: the handshake went on.
    pub const TCP_ESTABLISHED: u32 = 1 << 3;
    /// Client and backend are the same pod: the source is NATed to
    /// [`super::HAIRPIN_ADDR`] too.
    pub const HAIRPIN: u32 = 1 << 4;
    /// North-south flow to a backend on another node: the source is NATed
    /// to the node (see `CtValue::nat_addr`).
    pub const SNAT: u32 = 1 << 5;
    /// North-south flow to a backend on another node in DSR mode: on the
    /// receiving node the SERVICE entry; on the backend's node the REPLY
    /// entry whose `nat_addr`/`nat_port` is the frontend to answer from.
    pub const DSR: u32 = 1 << 6;

    /// Every bit by the name `proxyctl` prints.
    pub const NAMES: [(u32, &str); 7] = [
        (TCP_SYN, "syn"),
        (TCP_FIN, "fin"),
        (TCP_RST, "rst"),
        (TCP_ESTABLISHED, "established"),
        (HAIRPIN, "hairpin"),
        (SNAT, "snat"),
        (DSR, "dsr"),
    ];
}

/// Node-wide settings the agent writes into [`maps::CONFIG`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The node's address north-south traffic to remote backends is SNATed
    /// to; network byte order. 0: not configured (no SNAT, no remote
    /// north-south backends).
    pub node_addr: u32,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// The cluster's pod networks (`--cluster-cidr`), while no frontend
    /// lies inside them: a packet to an address inside one is pod traffic
    /// (a backend socket LB or another node already chose, or no service at
    /// all) and skips the frontend lookup. Unused slots are all zero.
    pub pod_nets: [Net4; POD_NETS],
}

/// Slots of [`Config::pod_nets`].
pub const POD_NETS: usize = 4;

/// An IPv4 prefix: address and mask, both network byte order. A zero mask
/// is an unused slot (it matches nothing, not everything).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net4 {
    pub addr: u32,
    pub mask: u32,
}

impl Net4 {
    /// `addr/len`, `addr` in network byte order (`u32::from_ne_bytes` of
    /// the octets); a `len` of 0 or above 32 gives the unused slot.
    pub const fn new(addr: u32, len: u8) -> Net4 {
        if len == 0 || len > 32 {
            return Net4 { addr: 0, mask: 0 };
        }
        let mask = (u32::MAX << (32 - len as u32)).to_be();
        Net4 {
            addr: addr & mask,
            mask,
        }
    }

    /// Whether `addr` (network order) is inside; never for an unused slot.
    #[inline(always)]
    pub const fn contains(&self, addr: u32) -> bool {
        self.mask != 0 && addr & self.mask == self.addr
    }
}

/// [`Config::flags`] bits.
pub mod config_flags {
    /// Remote north-south backends answer the client directly (DSR): the
    /// frontend travels to the backend's node in an IPv4 option
    /// ([`super::DSR_OPT_TYPE`]) instead of the flow being SNATed.
    pub const DSR: u32 = 1 << 0;
}

/// Slots of [`maps::REPLY_DSTS`] (a power of two).
pub const REPLY_DSTS_SLOTS: u32 = 1 << REPLY_DSTS_BITS;
const REPLY_DSTS_BITS: u32 = 14;

/// The [`maps::REPLY_DSTS`] slot of a reply's destination address (raw,
/// network order): a multiplicative hash. The kernel sets the slot before
/// it writes any conntrack REPLY entry (keyed by the reply's tuple) and
/// never clears it, so a packet whose destination's slot is clear cannot
/// be the reply of a tracked flow. An IPv6 address is first folded to one
/// word (the XOR of its four raw words): one slot set for both families. Distinct addresses may share a slot:
/// that only costs the conntrack lookup a clear slot saves.
#[inline(always)]
pub const fn reply_dst_slot(addr: u32) -> u32 {
    addr.wrapping_mul(0x9e37_79b1) >> (32 - REPLY_DSTS_BITS)
}

/// IPv4 option type carrying the frontend for DSR (copied flag set,
/// experimental number, as Cilium's): type, length 8, port (2), address (4).
pub const DSR_OPT_TYPE: u8 = 0x9a;

/// Indices into the per-CPU [`maps::STATS`] array.
pub mod stat {
    /// TCP/UDP packets (IPv4 and, on pods' interfaces, IPv6) the programs
    /// examined.
    pub const PACKETS: u32 = 0;
    /// Packets translated to a backend (DNAT).
    pub const DNAT: u32 = 1;
    /// Replies translated back to the frontend (reverse NAT).
    pub const REV_NAT: u32 = 2;
    /// Packets for a frontend without backends, dropped.
    pub const DROP_NO_BACKEND: u32 = 3;
    /// Conntrack inserts that failed.
    pub const CT_INSERT_FAIL: u32 = 4;
    /// Frames passed untouched because they were truncated or malformed.
    pub const PASS_MALFORMED: u32 = 5;
    /// IPv4 packets with options, passed untouched.
    pub const PASS_IP_OPTIONS: u32 = 6;
    /// Non-first fragments whose first fragment was not translated here
    /// (not a service flow, or it has not arrived yet), and IPv6 later
    /// fragments whose fragment header is not followed directly by TCP or
    /// UDP, passed untouched.
    pub const PASS_FRAGMENT: u32 = 7;
    /// Slot or backend missing for a frontend (a race or a bug), dropped.
    pub const DROP_NO_SLOT: u32 = 8;
    /// Packet rewrite (store/checksum helper) failed, dropped.
    pub const DROP_REWRITE: u32 = 9;
    /// TCP SYN to a frontend without backends, answered with a RST.
    pub const REJECT_TCP_RST: u32 = 10;
    /// UDP to a frontend without backends, answered with ICMP port unreachable.
    pub const REJECT_ICMP: u32 = 11;
    /// connect()/sendmsg() translated by the socket hooks.
    pub const SOCK_XLATE: u32 = 12;
    /// connect()/sendmsg() refused by the socket hooks (no backend).
    pub const SOCK_REFUSED: u32 = 13;
    /// Hairpin flows (client is its own backend).
    pub const HAIRPIN: u32 = 14;
    /// Affinity map hits.
    pub const AFFINITY_HIT: u32 = 15;
    /// TCP to a frontend that is neither a connection attempt nor part of a
    /// tracked flow (conntrack INVALID in kube-proxy's terms), dropped.
    pub const DROP_CT_INVALID: u32 = 16;
    /// Client outside a LoadBalancer frontend's `loadBalancerSourceRanges`,
    /// dropped.
    pub const DROP_SOURCE_RANGE: u32 = 17;
    /// Non-first fragments (IPv4, IPv6) matched to their first fragment's ports
    /// ([`super::maps::FRAGMENTS`], [`super::maps::FRAGMENTS6`]), so they follow its flow (counted at
    /// each hook that matches one).
    pub const FRAG_MATCHED: u32 = 18;
    /// DSR packets that the 8-byte option would push over the egress MTU:
    /// dropped, and answered with ICMP "fragmentation needed" (next-hop MTU
    /// less 8) when they carry DF, so the client's path MTU adapts.
    pub const DROP_DSR_MTU: u32 = 19;
    /// North-south SNAT found no free node port for a (node, backend) pair
    /// within its bounded probe: the new flow is dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 20;
    /// IPv6 packets whose extension-header chain is longer than the
    /// parser's bound (`IPV6_MAX_EXT_HDRS` in the kernel side) or holds a
    /// header it does not walk (authentication, ESP, mobility ...), passed
    /// untouched.
    pub const PASS_IPV6_EXT_HDRS: u32 = 21;
    /// IPv6 packets translated to a backend (also counted in `dnat`).
    pub const DNAT_V6: u32 = 22;
    /// Number of counters.
    pub const COUNT: u32 = 23;

    /// Counter names, indexed like the constants.
    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "dnat",
        "rev_nat",
        "drop_no_backend",
        "ct_insert_fail",
        "pass_malformed",
        "pass_ip_options",
        "pass_fragment",
        "drop_no_slot",
        "drop_rewrite",
        "reject_tcp_rst",
        "reject_icmp",
        "sock_xlate",
        "sock_refused",
        "hairpin",
        "affinity_hit",
        "drop_ct_invalid",
        "drop_source_range",
        "frag_matched",
        "drop_dsr_mtu",
        "drop_snat_exhausted",
        "pass_ipv6_ext_hdrs",
        "dnat_v6",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 8);
    assert!(core::mem::size_of::<ServiceValue>() == 24);
    assert!(core::mem::size_of::<AffinityMatchKey>() == 8);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<AffinityKey>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<SockRevNatKey>() == 16);
    assert!(core::mem::size_of::<SockRevNatValue>() == 12);
    assert!(core::mem::size_of::<SvcStats>() == 16);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<RevNat>() == 8);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtValue>() == 32);
    assert!(core::mem::size_of::<Net4>() == 8);
    assert!(core::mem::size_of::<Config>() == 8 + 8 * POD_NETS);
    assert!(core::mem::size_of::<SourceRangeKey>() == 8);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragValue>() == 4);
    assert!(core::mem::size_of::<ServiceKey6>() == 20);
    assert!(core::mem::size_of::<Backend6>() == 20);
    assert!(core::mem::size_of::<SockRevNatKey6>() == 32);
    assert!(core::mem::size_of::<SockRevNatValue6>() == 24);
    assert!(core::mem::size_of::<RevNat6>() == 20);
    assert!(core::mem::size_of::<CtKey6>() == 40);
    assert!(core::mem::size_of::<AffinityKey6>() == 24);
    assert!(core::mem::size_of::<FragKey6>() == 40);
    assert!(stat::NAMES.len() == stat::COUNT as usize);
};

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all are `#[repr(C)]`, `Copy`, contain only integers and have
    // no implicit padding (sizes asserted above), so any byte pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for SockRevNatKey6 {}
    unsafe impl aya::Pod for SockRevNatValue6 {}
    unsafe impl aya::Pod for RevNat6 {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for AffinityKey6 {}
    unsafe impl aya::Pod for FragKey6 {}
}

/// Conversions between the network-order fields above and `core::net` types.
impl ServiceKey {
    pub fn new(addr: core::net::Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr.octets()),
            port: port.to_be(),
            proto,
            scope: 0,
        }
    }
    pub fn ip(&self) -> core::net::Ipv4Addr {
        core::net::Ipv4Addr::from(self.addr.to_ne_bytes())
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Backend {
    pub fn new(addr: core::net::Ipv4Addr, port: u16, proto: u8, flags: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr.octets()),
            port: port.to_be(),
            proto,
            flags,
        }
    }
    pub fn ip(&self) -> core::net::Ipv4Addr {
        core::net::Ipv4Addr::from(self.addr.to_ne_bytes())
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// An [`Ip6`] from an address.
pub fn ip6_words(ip: core::net::Ipv6Addr) -> Ip6 {
    let o = ip.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The address of an [`Ip6`].
pub fn ip6_addr(words: Ip6) -> core::net::Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    core::net::Ipv6Addr::from(o)
}

impl ServiceKey6 {
    pub fn new(addr: core::net::Ipv6Addr, port: u16, proto: u8) -> Self {
        Self {
            addr: ip6_words(addr),
            port: port.to_be(),
            proto,
            scope: 0,
        }
    }
    pub fn ip(&self) -> core::net::Ipv6Addr {
        ip6_addr(self.addr)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl Backend6 {
    pub fn new(addr: core::net::Ipv6Addr, port: u16, proto: u8, flags: u8) -> Self {
        Self {
            addr: ip6_words(addr),
            port: port.to_be(),
            proto,
            flags,
        }
    }
    pub fn ip(&self) -> core::net::Ipv6Addr {
        ip6_addr(self.addr)
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl RevNat {
    pub fn ip(&self) -> core::net::Ipv4Addr {
        core::net::Ipv4Addr::from(self.addr.to_ne_bytes())
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl CtKey {
    pub fn src(&self) -> core::net::SocketAddrV4 {
        core::net::SocketAddrV4::new(
            core::net::Ipv4Addr::from(self.saddr.to_ne_bytes()),
            u16::from_be(self.sport),
        )
    }
    pub fn dst(&self) -> core::net::SocketAddrV4 {
        core::net::SocketAddrV4::new(
            core::net::Ipv4Addr::from(self.daddr.to_ne_bytes()),
            u16::from_be(self.dport),
        )
    }
}

/// Decoders: what `proxyctl`, the dump and the agent read out of map
/// entries, as typed values (the one place that knows each field's byte
/// order and each flag bit's name).
#[cfg(feature = "user")]
mod decode {
    use core::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    fn ip(addr: u32) -> Ipv4Addr {
        Ipv4Addr::from(addr.to_ne_bytes())
    }

    fn sock(addr: u32, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(ip(addr), u16::from_be(port))
    }

    /// Names of the bits of `flags` set in `bits`, in table order.
    fn names<T: Copy + core::ops::BitAnd<Output = T> + PartialEq + Default>(
        table: &'static [(T, &'static str)],
        bits: T,
    ) -> impl Iterator<Item = &'static str> {
        table
            .iter()
            .filter(move |(b, _)| bits & *b != T::default())
            .map(|(_, n)| *n)
    }

    /// `TCP`, `UDP`, `SCTP`; None for other protocol numbers.
    pub fn proto_name(p: u8) -> Option<&'static str> {
        match p {
            proto::TCP => Some("TCP"),
            proto::UDP => Some("UDP"),
            proto::SCTP => Some("SCTP"),
            _ => None,
        }
    }

    impl ServiceValue {
        /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
        pub fn kind_name(&self) -> &'static str {
            svc_flags::KIND_NAMES
                .iter()
                .find(|(b, _)| self.flags & b != 0)
                .map(|(_, n)| *n)
                .unwrap_or("ClusterIP")
        }
        /// Names of the non-kind flag bits set: `source-ranges`, `local-only`.
        pub fn flag_names(&self) -> impl Iterator<Item = &'static str> {
            names(&svc_flags::OTHER_NAMES, self.flags)
        }
        pub fn local_only(&self) -> bool {
            self.flags & svc_flags::LOCAL_ONLY != 0
        }
        pub fn has_source_ranges(&self) -> bool {
            self.flags & svc_flags::SOURCE_RANGES != 0
        }
    }

    impl Backend {
        pub fn is_terminating(&self) -> bool {
            self.flags & backend_flags::TERMINATING != 0
        }
        pub fn is_local(&self) -> bool {
            self.flags & backend_flags::LOCAL != 0
        }
    }

    impl Backend6 {
        pub fn is_terminating(&self) -> bool {
            self.flags & backend_flags::TERMINATING != 0
        }
        pub fn is_local(&self) -> bool {
            self.flags & backend_flags::LOCAL != 0
        }
    }

    impl RevNat {
        /// The frontend replies must carry.
        pub fn frontend(&self) -> SocketAddrV4 {
            sock(self.addr, self.port)
        }
    }

    impl CtKey {
        pub fn is_reply(&self) -> bool {
            self.dir == ct_dir::REPLY
        }
    }

    impl CtValue {
        /// Names of the flag bits set: syn, fin, rst, established, hairpin,
        /// snat, dsr.
        pub fn flag_names(&self) -> impl Iterator<Item = &'static str> {
            names(&ct_flags::NAMES, self.flags)
        }
        /// SNAT/DSR address (see the field); None when not NATed.
        pub fn nat(&self) -> Option<SocketAddrV4> {
            (self.nat_addr != 0).then(|| sock(self.nat_addr, self.nat_port))
        }
    }

    impl AffinityKey {
        /// The per-packet path's client IP (None: socket path).
        pub fn client_ip(&self) -> Option<Ipv4Addr> {
            (self.client_netns == 0).then(|| ip(self.client_addr))
        }
    }

    impl SockRevNatKey {
        pub fn backend(&self) -> SocketAddrV4 {
            sock(self.addr, self.port)
        }
    }

    impl SockRevNatValue {
        pub fn frontend(&self) -> SocketAddrV4 {
            sock(self.addr, self.port)
        }
    }

    fn sock6(addr: Ip6, port: u16) -> core::net::SocketAddrV6 {
        core::net::SocketAddrV6::new(ip6_addr(addr), u16::from_be(port), 0, 0)
    }

    impl SockRevNatKey6 {
        pub fn backend(&self) -> core::net::SocketAddrV6 {
            sock6(self.addr, self.port)
        }
    }

    impl SockRevNatValue6 {
        pub fn frontend(&self) -> core::net::SocketAddrV6 {
            sock6(self.addr, self.port)
        }
    }

    impl RevNat6 {
        /// The frontend replies must carry.
        pub fn frontend(&self) -> core::net::SocketAddrV6 {
            sock6(self.addr, self.port)
        }
    }

    impl FragKey6 {
        /// Source and destination with the ports of `v`.
        pub fn endpoints(
            &self,
            v: &FragValue,
        ) -> (core::net::SocketAddrV6, core::net::SocketAddrV6) {
            (sock6(self.saddr, v.sport), sock6(self.daddr, v.dport))
        }
        pub fn frag_id(&self) -> u32 {
            u32::from_be(self.id)
        }
    }

    impl AffinityKey6 {
        pub fn client_ip(&self) -> core::net::Ipv6Addr {
            ip6_addr(self.client_addr)
        }
    }

    impl CtKey6 {
        pub fn is_reply(&self) -> bool {
            self.dir == ct_dir::REPLY
        }
        pub fn src(&self) -> core::net::SocketAddrV6 {
            sock6(self.saddr, self.sport)
        }
        pub fn dst(&self) -> core::net::SocketAddrV6 {
            sock6(self.daddr, self.dport)
        }
    }

    impl SourceRangeKey {
        pub fn service_id(&self) -> u32 {
            u32::from_be(self.service_id_be)
        }
        pub fn ip(&self) -> Ipv4Addr {
            ip(self.addr)
        }
    }

    impl FragKey {
        /// Source and destination with the ports of `v`.
        pub fn endpoints(&self, v: &FragValue) -> (SocketAddrV4, SocketAddrV4) {
            (sock(self.saddr, v.sport), sock(self.daddr, v.dport))
        }
        pub fn ip_id(&self) -> u16 {
            u16::from_be(self.id)
        }
    }

    impl Config {
        /// The node address; None when not configured.
        pub fn node_ip(&self) -> Option<Ipv4Addr> {
            (self.node_addr != 0).then(|| ip(self.node_addr))
        }
        /// The pod networks in use (address, prefix length).
        pub fn pod_networks(&self) -> impl Iterator<Item = (Ipv4Addr, u8)> + '_ {
            self.pod_nets
                .iter()
                .filter(|n| n.mask != 0)
                .map(|n| (ip(n.addr), u32::from_be(n.mask).count_ones() as u8))
        }
    }
}

#[cfg(feature = "user")]
pub use decode::proto_name;
