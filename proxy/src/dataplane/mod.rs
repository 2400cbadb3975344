//! Dataplanes: one trait, one implementation per mode. A dataplane knows
//! frontends and backends ([`crate::lb`]), never Kubernetes objects.

pub mod cleanup;
pub mod ebpf;
pub mod fallback;
pub mod iptables;
pub mod iptables_rules;
pub mod ipvs;
pub mod ipvs_glue;
pub mod nftables;
pub mod nftables_rules;

// Where they were before the eBPF dataplane became a folder.
pub use ebpf::{conntrack, links};

use crate::{diff::Change, lb::LbTable};

/// What applying a batch of changes did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub upserted: usize,
    pub removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

/// One map's (or table's) fill level.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
    /// Inserts that failed since the agent started (a full map).
    pub insert_failures: u64,
}

impl MapFill {
    /// How full the map is: entries / capacity (Cilium's
    /// `bpf_map_pressure`), 0 for a map without capacity. An LRU map at
    /// 1.0 evicts; a hash map at 1.0 refuses inserts.
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

/// What a dataplane tells the agent about its maps' room (the agent logs
/// it and posts Events: the dataplane knows no Kubernetes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapEvent {
    /// An insert into `map` failed because it holds `capacity` entries:
    /// `what` (a frontend, or a backend) is not programmed.
    Full {
        map: &'static str,
        capacity: u32,
        /// The flag that sizes the map.
        flag: &'static str,
        what: String,
    },
    /// A sweep of the kernel-written LRU map `map` (conntrack) left
    /// `entries` of `capacity`: an LRU map never refuses an insert, it
    /// evicts, so its fill is watched instead.
    Swept {
        map: &'static str,
        entries: u64,
        capacity: u32,
        flag: &'static str,
    },
}

/// Traffic counters of one frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendCounters {
    /// `ip:port/PROTO`, as [`crate::lb::FrontendKey`] displays.
    pub frontend: String,
    pub kind: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What a dataplane can tell about its own state for `/metrics`. Every
/// part is optional: a mode fills in what it has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneStats {
    pub maps: Vec<MapFill>,
    /// Connection-tracking entries and capacity.
    pub conntrack: Option<MapFill>,
    pub frontends: Vec<FrontendCounters>,
    /// Dropped packets by reason.
    pub drops: Vec<(String, u64)>,
    /// Other data-path counters by name.
    pub counters: Vec<(String, u64)>,
    /// Sockets destroyed because their backend left its service, by
    /// protocol (eBPF socket LB).
    pub sock_destroyed: Vec<(String, u64)>,
    /// Failed socket-destroy runs (and netns not walked).
    pub sock_destroy_failures: u64,
}

/// Reads [`DataplaneStats`] concurrently with the sync loop (the metrics
/// endpoint owns it; the dataplane itself stays with the sync loop).
pub trait StatsReader: Send + Sync {
    fn read(&self) -> Result<DataplaneStats, Box<dyn std::error::Error + Send + Sync>>;
}

pub trait Dataplane {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The mode name (`/proxyMode`, logs).
    fn mode(&self) -> &'static str;

    /// What is programmed now, as found at start (pinned state of an earlier
    /// agent) plus everything applied since. The agent diffs against it;
    /// lent, never rebuilt per sync.
    fn programmed(&self) -> &LbTable;

    /// Apply changes computed by [`crate::diff::diff`].
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, Self::Error>;

    /// The node's address for north-south SNAT and DSR, handed over on
    /// every sync (it follows the Node object); None: unknown. Modes that
    /// do not use it ignore it.
    fn set_node_address(&mut self, _addr: Option<std::net::Ipv4Addr>) -> Result<(), Self::Error> {
        Ok(())
    }

    /// A full sync is about to program `frontends` frontends over
    /// `backends` distinct backends: room for them at once (a table that
    /// doubles while it fills holds both copies for a moment).
    fn reserve(&mut self, _frontends: usize, _backends: usize) {}

    /// Periodic work: attach to new interfaces, and so on.
    fn housekeeping(&mut self) -> Result<(), Self::Error>;

    /// Map events since the last call (full maps, conntrack sweeps); the
    /// agent takes them after every sync and housekeeping.
    fn take_map_events(&mut self) -> Vec<MapEvent> {
        Vec::new()
    }

    /// A reader of this dataplane's counters and fill levels for
    /// `/metrics`; None: the mode has none (only the agent's own metrics
    /// are served).
    fn stats_reader(&self) -> Option<Box<dyn StatsReader>> {
        None
    }
}
