//! Dataplanes: one trait, one implementation per mode. A dataplane knows
//! frontends and backends ([`crate::lb`]), never Kubernetes objects.

pub mod cleanup;
pub mod conntrack;
pub mod ebpf;
pub mod fallback;
pub mod iptables;
pub mod iptables_rules;
pub mod ipvs;
pub mod links;
pub mod nftables;
pub mod nftables_rules;

use crate::{diff::Change, lb::LbTable};

/// What applying a batch of changes did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub upserted: usize,
    pub removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

pub trait Dataplane {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The mode name (`/proxyMode`, logs).
    fn mode(&self) -> &'static str;

    /// What is programmed now, as found at start (pinned state of an earlier
    /// agent) plus everything applied since. The agent diffs against it.
    fn programmed(&self) -> LbTable;

    /// Apply changes computed by [`crate::diff::diff`].
    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, Self::Error>;

    /// Periodic work: attach to new interfaces, and so on.
    fn housekeeping(&mut self) -> Result<(), Self::Error>;
}
