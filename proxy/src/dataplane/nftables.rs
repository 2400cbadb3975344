//! `--mode nftables`: kube-proxy's nftables mode ([`super::nftables_rules`])
//! in one table of ours per address family (`ip` and `ip6`, as kube-proxy
//! runs one proxier per family), each written with one `nft -f`
//! transaction per sync that carries only the chains and map elements of
//! the frontends that changed. An agent starting where an earlier one left reads the table
//! and its first sync writes only what is missing or wrong there. Removed
//! UDP backends get their conntrack entries flushed.

use tracing::{debug, info, warn};

use super::{
    ApplyStats, Dataplane,
    fallback::{
        self, FallbackError, Family, RuleOptions, apply_in_place, change_stats, flush_udp_flows,
        incremental::{Delta, State},
        revert, stale_udp_flows_changed,
    },
    nftables_rules::{self, NftablesRules},
};
use crate::{diff::Change, lb::LbTable};

/// The mode's name.
const MODE: &str = "nftables";

/// Frontends per `nft -f` in a sync that compares every item.
const CHUNK: usize = 1000;

/// One family's table: its rules, what it holds, whether the next write
/// compares every item.
struct FamilyTable {
    rules: NftablesRules,
    /// What the table holds (fingerprints) and which frontend wants what.
    state: State,
    /// The next write compares every item, not only the changed
    /// frontends' (first sync; after a failed write).
    full: bool,
}

pub struct NftablesDataplane {
    programmed: LbTable,
    /// The IPv4 table, then the IPv6 one (unless the kernel refused it).
    tables: Vec<FamilyTable>,
    /// IPv6 frontends left out when there is no IPv6 table.
    ipv6_left: Option<fallback::Ipv6Left>,
}

fn nft(input: &str) -> Result<(), FallbackError> {
    debug!(bytes = input.len(), "nft -f");
    fallback::run("nft", &["-f", "-"], Some(input)).map(|_| ())
}

fn list(family: Family) -> Result<String, FallbackError> {
    fallback::run(
        "nft",
        &["list", "table", family.nft(), nftables_rules::TABLE],
        None,
    )
}

/// Remove our tables (both families). Returns whether one existed.
pub fn cleanup() -> Result<bool, FallbackError> {
    let mut existed = false;
    for family in Family::BOTH {
        if list(family).is_ok() {
            existed = true;
            nft(&nftables_rules::render_cleanup(family))?;
        }
    }
    Ok(existed)
}

/// What our table of the rules' family holds now (nothing if it does not
/// exist).
fn read_state(rules: &NftablesRules) -> State {
    match list(rules.family) {
        Ok(list) => State::adopt(nftables_rules::found(&list, rules)),
        Err(_) => State::default(),
    }
}

impl FamilyTable {
    /// Creates the table unless it exists, and its fixed chains where
    /// they are missing or wrong; what an earlier run left is kept for
    /// the first sync to compare.
    fn new(opts: RuleOptions, family: Family) -> Result<FamilyTable, FallbackError> {
        let rules = NftablesRules::new(opts, family);
        let mut state = read_state(&rules);
        let found = state.written_count();
        if found > 0 {
            info!(
                family = family.name(),
                items = found,
                "found the table of an earlier run; the first sync keeps what is right there"
            );
        }
        let delta = state.plan_fixed(&rules);
        let mut input = nftables_rules::render_prelude(family);
        input.push_str(&nftables_rules::render(&delta, family).0);
        nft(&input)?;
        state.commit(delta);
        Ok(FamilyTable {
            rules,
            state,
            full: true,
        })
    }
}

impl NftablesDataplane {
    /// Creates our tables (`ip` and `ip6`) unless they exist, and their
    /// fixed chains where they are missing or wrong. A kernel without
    /// IPv6 (the `ip6` table refused) gets the IPv4 table only, and the
    /// IPv6 frontends are counted as left out.
    pub fn new(opts: RuleOptions) -> Result<NftablesDataplane, FallbackError> {
        let mut tables = vec![FamilyTable::new(opts.clone(), Family::V4)?];
        let mut ipv6_left = None;
        match FamilyTable::new(opts, Family::V6) {
            Ok(t) => tables.push(t),
            Err(e) => {
                warn!(error = %e, "no ip6 table: IPv6 frontends are not programmed");
                ipv6_left = Some(fallback::Ipv6Left::default());
            }
        }
        Ok(NftablesDataplane {
            programmed: LbTable::default(),
            tables,
            ipv6_left,
        })
    }
}

impl Dataplane for NftablesDataplane {
    type Error = FallbackError;

    fn mode(&self) -> &'static str {
        MODE
    }

    fn programmed(&self) -> &LbTable {
        &self.programmed
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, FallbackError> {
        let before = apply_in_place(&mut self.programmed, changes);
        let mut plan = nftables_rules::Plan::default();
        let mut failed = None;
        for t in &mut self.tables {
            let family = t.rules.family;
            let mut write = |delta: &Delta, prelude: bool| {
                fallback::run_streamed("nft", &["-f", "-"], |out| {
                    if prelude {
                        // Someone may have deleted the table since.
                        let _ = out.write_str(&nftables_rules::render_prelude(family));
                    }
                    let p = nftables_rules::render_to(out, delta, false, family);
                    let (a, b, c, d) = &mut plan.counts;
                    *a += p.counts.0;
                    *b += p.counts.1;
                    *c += p.counts.2;
                    *d += p.counts.3;
                })
                .map(|_| ())
            };
            let written = if t.full {
                // Every item compared, written a chunk of frontends at a
                // time: the rules of 10k services are never all in memory.
                let mut first = true;
                t.state
                    .plan_full_chunked(&t.rules, &self.programmed.frontends, CHUNK, |delta| {
                        write(&delta, std::mem::take(&mut first))?;
                        Ok(true)
                    })
            } else {
                // Only the changed frontends of this family.
                let mine: Vec<_> = before
                    .iter()
                    .filter(|(k, _)| family.has(k))
                    .cloned()
                    .collect();
                let delta = t
                    .state
                    .plan(&t.rules, &self.programmed.frontends, Some(&mine));
                let r = if delta.is_empty() {
                    Ok(())
                } else {
                    write(&delta, false)
                };
                if r.is_ok() {
                    t.state.commit(delta);
                }
                r
            };
            match written {
                Ok(()) => t.full = false,
                Err(e) => {
                    // State unknown now: re-read the table, compare
                    // everything next time.
                    t.state = read_state(&t.rules);
                    t.full = true;
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            // The agent retries the same changes (a family written
            // already finds its items right and writes nothing).
            revert(&mut self.programmed, before);
            return Err(e);
        }
        debug!(
            chains_written = plan.counts.0,
            chains_deleted = plan.counts.1,
            elements_added = plan.counts.2,
            elements_deleted = plan.counts.3,
            "nft tables"
        );
        let mut flows = stale_udp_flows_changed(&before, &self.programmed.frontends);
        if let Some(left) = &mut self.ipv6_left {
            flows.retain(|(vip, _, _)| vip.is_ipv4());
            left.after_sync(MODE, &self.programmed.frontends);
        }
        flush_udp_flows(&flows);
        Ok(change_stats(&before, &self.programmed.frontends))
    }

    fn housekeeping(&mut self) -> Result<(), FallbackError> {
        Ok(())
    }
}
