//! `--mode iptables`: kube-proxy's iptables rules ([`super::iptables_rules`])
//! written with one `iptables-restore --noflush` per sync that carries only
//! the chains and shared-chain rules of the frontends that changed;
//! removed UDP backends get their conntrack entries flushed. Nothing
//! outside our chains and our jumps into them is touched.

use tracing::{debug, info};

use super::{
    ApplyStats, Dataplane,
    fallback::{
        self, FallbackError, RuleOptions, apply_in_place, change_stats, flush_udp_flows,
        incremental::{Delta, Item, State},
        revert, stale_udp_flows_changed,
    },
    iptables_rules::{self, HAIRPIN_SET, HAIRPIN_SET_TYPE, IptablesRules, JUMP_COMMENT},
};
use crate::{diff::Change, lb::LbTable};

/// Frontends per `iptables-restore` in a sync that compares every item.
const CHUNK: usize = 1000;

pub struct IptablesDataplane {
    programmed: LbTable,
    rules: IptablesRules,
    /// What our chains hold (fingerprints) and which frontend wants what.
    state: State,
    /// The next write compares every item, not only the changed
    /// frontends' (first sync: adopt what an earlier run left; after a
    /// failed write: the kernel was re-read).
    full: bool,
    ticks: u32,
    /// IPv6 frontends left out (IPv4 only for now).
    ipv6_left: fallback::Ipv6Left,
}

fn save(table: &str) -> Result<String, FallbackError> {
    fallback::run("iptables-save", &["-t", table], None)
}

/// Insert `jumps` (table, built-in chain, rule spec) unless present.
pub(super) fn ensure_jumps(jumps: &[(&str, &str, String)]) -> Result<(), FallbackError> {
    for (table, chain, spec) in jumps {
        let spec: Vec<&str> = spec.split_whitespace().collect();
        let mut check = vec!["-w", "5", "-t", table, "-C", chain];
        check.extend(&spec);
        if fallback::run("iptables", &check, None).is_ok() {
            continue;
        }
        let mut insert = vec!["-w", "5", "-t", table, "-I", chain, "1"];
        insert.extend(&spec);
        fallback::run("iptables", &insert, None)?;
    }
    Ok(())
}

/// Remove every jump into our chains from the built-in chains, and all our
/// chains. Returns whether anything was found.
pub fn cleanup() -> Result<bool, FallbackError> {
    let mut found = remove_jumps(JUMP_COMMENT)?;
    let filter = iptables_rules::our_chains(&save("filter")?, "filter");
    let nat = iptables_rules::our_chains(&save("nat")?, "nat");
    if !filter.is_empty() || !nat.is_empty() {
        found = true;
        let input = iptables_rules::render_cleanup(&filter, &nat);
        fallback::run("iptables-restore", &["-w", "5", "--noflush"], Some(&input))?;
    }
    // Nothing refers to the hairpin set once the chains are gone.
    if fallback::run("ipset", &["list", "-n", HAIRPIN_SET], None).is_ok() {
        found = true;
        fallback::run("ipset", &["destroy", HAIRPIN_SET], None)?;
    }
    if found {
        remove_empty_nft_builtins();
    }
    Ok(found)
}

/// Delete every rule of the filter and nat tables whose comment is exactly
/// `comment` (our jumps from the built-in chains), each by its saved spec.
/// Returns whether there was any.
pub(super) fn remove_jumps(comment: &str) -> Result<bool, FallbackError> {
    let mut found = false;
    for table in ["filter", "nat"] {
        for line in save(table)?.lines() {
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let Some(chain) = words.next() else { continue };
            let spec: Vec<&str> = words.collect();
            if !spec.windows(2).any(|w| w == ["--comment", comment]) {
                continue;
            }
            let mut del = vec!["-w", "5", "-t", table, "-D", chain];
            del.extend(&spec);
            fallback::run("iptables", &del, None)?;
            found = true;
        }
    }
    Ok(found)
}

/// iptables-nft creates a built-in chain (as an nftables base chain) the
/// first time a rule goes in; once our jumps are gone it may be left empty.
/// An empty base chain with policy accept is a no-op and iptables-nft
/// recreates it on demand, so removing it (and a table left with nothing)
/// brings `nft list ruleset` back to what it was; `iptables-save` shows
/// built-in chains either way.
pub(super) fn remove_empty_nft_builtins() {
    let nf_tables =
        fallback::run("iptables", &["--version"], None).is_ok_and(|v| v.contains("nf_tables"));
    if !nf_tables {
        return;
    }
    for (table, chains) in [
        ("nat", &["PREROUTING", "OUTPUT", "POSTROUTING"][..]),
        ("filter", &["INPUT", "FORWARD", "OUTPUT"][..]),
    ] {
        for chain in chains {
            let Ok(list) = fallback::run("nft", &["list", "chain", "ip", table, chain], None)
            else {
                continue;
            };
            if iptables_rules::is_empty_accept_base_chain(&list) {
                let _ = fallback::run("nft", &["delete", "chain", "ip", table, chain], None);
            }
        }
        if let Ok(list) = fallback::run("nft", &["list", "table", "ip", table], None)
            && !list.contains("chain ")
            && !list.contains("set ")
            && !list.contains("map ")
        {
            let _ = fallback::run("nft", &["delete", "table", "ip", table], None);
        }
    }
}

/// What our chains and our ip set in the kernel hold now.
fn read_state(rules: &IptablesRules) -> Result<State, FallbackError> {
    let mut found = iptables_rules::found(&save("filter")?, "filter", rules);
    found.extend(iptables_rules::found(&save("nat")?, "nat", rules));
    if let Ok(save) = fallback::run("ipset", &["save", HAIRPIN_SET], None) {
        found.extend(iptables_rules::found_ipset(&save, rules));
    }
    Ok(State::adopt(found))
}

/// Creates the hairpin ip set unless it exists (KUBE-POSTROUTING refers
/// to it).
fn ensure_hairpin_set() -> Result<(), FallbackError> {
    let mut args = vec!["create", HAIRPIN_SET];
    args.extend(HAIRPIN_SET_TYPE);
    args.push("-exist");
    fallback::run("ipset", &args, None).map(|_| ())
}

fn ipset_restore(input: &str) -> Result<(), FallbackError> {
    if input.is_empty() {
        return Ok(());
    }
    debug!(bytes = input.len(), "ipset restore");
    fallback::run("ipset", &["restore", "-exist"], Some(input)).map(|_| ())
}

fn restore(input: &str) -> Result<(), FallbackError> {
    debug!(bytes = input.len(), "iptables-restore");
    fallback::run("iptables-restore", &["-w", "5", "--noflush"], Some(input)).map(|_| ())
}

impl IptablesDataplane {
    /// Checks the tools work, reads what an earlier run left in our chains
    /// (the first sync rewrites only what is wrong or missing there and
    /// deletes what is not wanted), writes the fixed chains if needed and
    /// installs the jumps.
    pub fn new(opts: RuleOptions) -> Result<IptablesDataplane, FallbackError> {
        let rules = IptablesRules { opts };
        let mut state = read_state(&rules)?;
        let found = state.written_count();
        if found > 0 {
            info!(
                items = found,
                "found chains of an earlier run; the first sync keeps what is right there"
            );
        }
        ensure_hairpin_set()?;
        // The jumps need the chains to exist: write the fixed ones first.
        let delta = state.plan_fixed(&rules);
        let (input, _) = iptables_rules::render(&delta);
        if !input.is_empty() {
            restore(&input)?;
        }
        state.commit(delta);
        ensure_jumps(&iptables_rules::jumps())?;
        Ok(IptablesDataplane {
            programmed: LbTable::default(),
            rules,
            state,
            full: true,
            ipv6_left: fallback::Ipv6Left::default(),
            ticks: 0,
        })
    }
}

impl Dataplane for IptablesDataplane {
    type Error = FallbackError;

    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn programmed(&self) -> &LbTable {
        &self.programmed
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, FallbackError> {
        let before = apply_in_place(&mut self.programmed, changes);
        // (chains written, deleted, shared rules added, deleted, hairpin
        // entries added, deleted)
        let mut n = [0usize; 6];
        let mut write = |delta: &Delta| -> Result<(), FallbackError> {
            // Hairpin entries go in before the rules that DNAT to them,
            // and out after.
            let (set_add, set_del) = iptables_rules::render_ipset(delta);
            ipset_restore(&set_add)?;
            let is_rule = |i: &Item| !matches!(i, Item::Element(..));
            if delta.upsert.iter().any(|(i, _, _)| is_rule(i))
                || delta.delete.iter().any(|(i, _)| is_rule(i))
            {
                fallback::run_streamed("iptables-restore", &["-w", "5", "--noflush"], |out| {
                    let p = iptables_rules::render_to(out, delta);
                    n[0] += p.written.len();
                    n[1] += p.deleted.len();
                    n[2] += p.rules_added;
                    n[3] += p.rules_deleted;
                })?;
            }
            ipset_restore(&set_del)?;
            n[4] += set_add.lines().count();
            n[5] += set_del.lines().count();
            Ok(())
        };
        let written = if self.full {
            // Every item compared, written a chunk of frontends at a
            // time: the rules of 10k services are never all in memory.
            self.state
                .plan_full_chunked(&self.rules, &self.programmed.frontends, CHUNK, |delta| {
                    write(&delta).map(|()| true)
                })
        } else {
            let delta = self
                .state
                .plan(&self.rules, &self.programmed.frontends, Some(&before));
            let r = if delta.is_empty() {
                Ok(())
            } else {
                write(&delta)
            };
            if r.is_ok() {
                self.state.commit(delta);
            }
            r
        };
        if let Err(e) = written {
            // Kernel state unknown now: re-read it, compare everything
            // next time; the agent retries the same changes.
            revert(&mut self.programmed, before);
            self.state = read_state(&self.rules).unwrap_or_default();
            self.full = true;
            return Err(e);
        }
        self.full = false;
        debug!(
            written = n[0],
            deleted = n[1],
            rules_added = n[2],
            rules_deleted = n[3],
            hairpin_added = n[4],
            hairpin_deleted = n[5],
            "iptables chains"
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
        // Someone flushing the built-in chains drops our jumps: put them
        // back (every 30 ticks: each check is a process).
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(30) {
            ensure_jumps(&iptables_rules::jumps())?;
        }
        Ok(())
    }
}

/// Counts for the sync log line (shared with the nftables mode).
pub fn stats(before: &LbTable, changes: &[Change]) -> ApplyStats {
    let mut s = ApplyStats::default();
    for c in changes {
        match c {
            Change::Upsert(k, f) => {
                s.upserted += 1;
                let old = before.frontends.get(k).map(|o| &o.backends);
                s.backends_added += f
                    .backends
                    .iter()
                    .filter(|b| old.is_none_or(|o| !o.contains(b)))
                    .count();
                if let Some(o) = old {
                    s.backends_removed += o.iter().filter(|b| !f.backends.contains(b)).count();
                }
            }
            Change::Remove(k) => {
                s.removed += 1;
                s.backends_removed += before.frontends.get(k).map_or(0, |f| f.backends.len());
            }
        }
    }
    s
}
