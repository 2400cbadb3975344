//! `--mode nftables`: kube-proxy's nftables mode ([`super::nftables_rules`])
//! in one table of ours, written with one `nft -f` transaction per sync;
//! after the first sync only changed chains and map elements are written.
//! Removed UDP backends get their conntrack entries flushed.

use tracing::debug;

use super::{
    ApplyStats, Dataplane,
    fallback::{self, FallbackError, RuleOptions, applied, flush_udp_flows, stale_udp_flows},
    iptables::stats,
    nftables_rules::{self, Ruleset},
};
use crate::{diff::Change, lb::LbTable};

pub struct NftablesDataplane {
    programmed: LbTable,
    opts: RuleOptions,
    /// Our table as last written; None until the first write (which
    /// recreates the table, dropping whatever an earlier run left).
    written: Option<Ruleset>,
}

fn nft(input: &str) -> Result<(), FallbackError> {
    debug!(bytes = input.len(), "nft -f");
    fallback::run("nft", &["-f", "-"], Some(input)).map(|_| ())
}

/// Remove our table. Returns whether it existed.
pub fn cleanup() -> Result<bool, FallbackError> {
    let existed =
        fallback::run("nft", &["list", "table", "ip", nftables_rules::TABLE], None).is_ok();
    if existed {
        nft(&nftables_rules::render_cleanup())?;
    }
    Ok(existed)
}

impl NftablesDataplane {
    /// Creates our (empty) table, replacing one an earlier run left.
    pub fn new(opts: RuleOptions) -> Result<NftablesDataplane, FallbackError> {
        let mut dp = NftablesDataplane {
            programmed: LbTable::default(),
            opts,
            written: None,
        };
        dp.write(&LbTable::default())?;
        Ok(dp)
    }

    fn write(&mut self, next: &LbTable) -> Result<nftables_rules::Plan, FallbackError> {
        let rules = nftables_rules::generate(&next.frontends, &self.opts);
        let (input, plan) = nftables_rules::render(&rules, self.written.as_ref());
        if !input.is_empty() {
            nft(&input)?;
        }
        self.written = Some(rules);
        Ok(plan)
    }
}

impl Dataplane for NftablesDataplane {
    type Error = FallbackError;

    fn mode(&self) -> &'static str {
        "nftables"
    }

    fn programmed(&self) -> &LbTable {
        &self.programmed
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, FallbackError> {
        let next = applied(&self.programmed, changes);
        let plan = match self.write(&next) {
            Ok(p) => p,
            Err(e) => {
                // State unknown now: recreate the table next time.
                self.written = None;
                return Err(e);
            }
        };
        debug!(
            chains_written = plan.chains_written.len(),
            chains_deleted = plan.chains_deleted.len(),
            elements_added = plan.elements_added.len(),
            elements_deleted = plan.elements_deleted.len(),
            "nft table"
        );
        flush_udp_flows(&stale_udp_flows(
            &self.programmed.frontends,
            &next.frontends,
        ));
        let stats = stats(&self.programmed, changes);
        self.programmed = next;
        Ok(stats)
    }

    fn housekeeping(&mut self) -> Result<(), FallbackError> {
        Ok(())
    }
}
