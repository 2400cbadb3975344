//! `--mode nftables`: kube-proxy's nftables mode ([`super::nftables_rules`])
//! in one table of ours, written with one `nft -f` transaction per sync
//! that carries only the chains and map elements of the frontends that
//! changed. An agent starting where an earlier one left reads the table
//! and its first sync writes only what is missing or wrong there. Removed
//! UDP backends get their conntrack entries flushed.

use tracing::{debug, info};

use super::{
    ApplyStats, Dataplane,
    fallback::{
        self, FallbackError, RuleOptions, apply_in_place, change_stats, flush_udp_flows,
        incremental::{Delta, State},
        revert, stale_udp_flows_changed,
    },
    nftables_rules::{self, NftablesRules},
};
use crate::{diff::Change, lb::LbTable};

/// Frontends per `nft -f` in a sync that compares every item.
const CHUNK: usize = 1000;

pub struct NftablesDataplane {
    programmed: LbTable,
    rules: NftablesRules,
    /// What our table holds (fingerprints) and which frontend wants what.
    state: State,
    /// The next write compares every item, not only the changed
    /// frontends' (first sync; after a failed write).
    full: bool,
    /// IPv6 frontends left out (IPv4 only for now).
    ipv6_left: fallback::Ipv6Left,
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

/// What our table holds now (nothing if it does not exist).
fn read_state(rules: &NftablesRules) -> State {
    match fallback::run("nft", &["list", "table", "ip", nftables_rules::TABLE], None) {
        Ok(list) => State::adopt(nftables_rules::found(&list, rules)),
        Err(_) => State::default(),
    }
}

impl NftablesDataplane {
    /// Creates our table unless it exists, and its fixed chains where they
    /// are missing or wrong; what an earlier run left is kept for the
    /// first sync to compare.
    pub fn new(opts: RuleOptions) -> Result<NftablesDataplane, FallbackError> {
        let rules = NftablesRules { opts };
        let mut state = read_state(&rules);
        let found = state.written_count();
        if found > 0 {
            info!(
                items = found,
                "found the table of an earlier run; the first sync keeps what is right there"
            );
        }
        let delta = state.plan_fixed(&rules);
        let mut input = nftables_rules::render_prelude();
        input.push_str(&nftables_rules::render(&delta).0);
        nft(&input)?;
        state.commit(delta);
        Ok(NftablesDataplane {
            programmed: LbTable::default(),
            rules,
            state,
            full: true,
            ipv6_left: fallback::Ipv6Left::default(),
        })
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
        let before = apply_in_place(&mut self.programmed, changes);
        let full = self.full;
        let mut plan = nftables_rules::Plan::default();
        let mut write = |delta: &Delta, prelude: bool| {
            fallback::run_streamed("nft", &["-f", "-"], |out| {
                if prelude {
                    // Someone may have deleted the table since.
                    let _ = out.write_str(&nftables_rules::render_prelude());
                }
                let p = nftables_rules::render_to(out, delta, false);
                let (a, b, c, d) = &mut plan.counts;
                *a += p.counts.0;
                *b += p.counts.1;
                *c += p.counts.2;
                *d += p.counts.3;
            })
            .map(|_| ())
        };
        let written = if full {
            // Every item compared, written a chunk of frontends at a
            // time: the rules of 10k services are never all in memory.
            let mut first = true;
            self.state
                .plan_full_chunked(&self.rules, &self.programmed.frontends, CHUNK, |delta| {
                    write(&delta, std::mem::take(&mut first))?;
                    Ok(true)
                })
        } else {
            let delta = self
                .state
                .plan(&self.rules, &self.programmed.frontends, Some(&before));
            let r = if delta.is_empty() {
                Ok(())
            } else {
                write(&delta, false)
            };
            if r.is_ok() {
                self.state.commit(delta);
            }
            r
        };
        if let Err(e) = written {
            // State unknown now: re-read the table, compare everything
            // next time; the agent retries the same changes.
            revert(&mut self.programmed, before);
            self.state = read_state(&self.rules);
            self.full = true;
            return Err(e);
        }
        self.full = false;
        debug!(
            chains_written = plan.counts.0,
            chains_deleted = plan.counts.1,
            elements_added = plan.counts.2,
            elements_deleted = plan.counts.3,
            "nft table"
        );
        flush_udp_flows(&stale_udp_flows_changed(
            &before,
            &self.programmed.frontends,
        ));
        self.ipv6_left
            .after_sync(self.mode(), &self.programmed.frontends);
        Ok(change_stats(&before, &self.programmed.frontends))
    }

    fn housekeeping(&mut self) -> Result<(), FallbackError> {
        Ok(())
    }
}
