//! `--mode iptables`: kube-proxy's iptables rules ([`super::iptables_rules`])
//! for the IPv4 frontends in iptables and for the IPv6 ones in ip6tables
//! (kube-proxy runs one proxier per family), written with one
//! `iptables-restore --noflush` (`ip6tables-restore`) per family and sync
//! that carries only the chains and shared-chain rules of the frontends
//! that changed;
//! removed UDP backends get their conntrack entries flushed. Nothing
//! outside our chains and our jumps into them is touched.

use tracing::{debug, info, warn};

use super::{
    ApplyStats, Dataplane,
    fallback::{
        self, FallbackError, Family, RuleOptions, apply_in_place, change_stats, flush_udp_flows,
        incremental::{Delta, Item, State},
        revert, stale_udp_flows_changed,
    },
    iptables_rules::{self, IptablesRules, JUMP_COMMENT, hairpin_set, hairpin_set_type},
};
use crate::{diff::Change, lb::LbTable};

/// The mode's name.
const MODE: &str = "iptables";

/// Frontends per `iptables-restore` in a sync that compares every item.
const CHUNK: usize = 1000;

/// One family's rules (iptables or ip6tables): what our chains hold, and
/// whether the next write compares every item.
struct FamilyRules {
    rules: IptablesRules,
    /// What our chains hold (fingerprints) and which frontend wants what.
    state: State,
    /// The next write compares every item, not only the changed
    /// frontends' (first sync: adopt what an earlier run left; after a
    /// failed write: the kernel was re-read).
    full: bool,
}

pub struct IptablesDataplane {
    programmed: LbTable,
    /// iptables, then ip6tables (unless it is missing or refused).
    families: Vec<FamilyRules>,
    ticks: u32,
    /// IPv6 frontends left out when there is no ip6tables.
    ipv6_left: Option<fallback::Ipv6Left>,
}

fn save(family: Family, table: &str) -> Result<String, FallbackError> {
    fallback::run(family.iptables_save(), &["-t", table], None)
}

/// Insert `jumps` (table, built-in chain, rule spec) unless present
/// (iptables).
pub(super) fn ensure_jumps(jumps: &[(&str, &str, String)]) -> Result<(), FallbackError> {
    ensure_jumps_in(Family::V4, jumps)
}

/// [`ensure_jumps`] with the tool of `family`.
fn ensure_jumps_in(family: Family, jumps: &[(&str, &str, String)]) -> Result<(), FallbackError> {
    let tool = family.iptables();
    for (table, chain, spec) in jumps {
        let spec: Vec<&str> = spec.split_whitespace().collect();
        let mut check = vec!["-w", "5", "-t", table, "-C", chain];
        check.extend(&spec);
        if fallback::run(tool, &check, None).is_ok() {
            continue;
        }
        let mut insert = vec!["-w", "5", "-t", table, "-I", chain, "1"];
        insert.extend(&spec);
        fallback::run(tool, &insert, None)?;
    }
    Ok(())
}

/// Remove every jump into our chains from the built-in chains, and all our
/// chains, in iptables and ip6tables (where the tool exists). Returns
/// whether anything was found.
pub fn cleanup() -> Result<bool, FallbackError> {
    let mut found = false;
    for family in Family::BOTH {
        match cleanup_family(family) {
            Ok(f) => found |= f,
            // No ip6tables on this machine: nothing of ours there either.
            Err(FallbackError::Spawn { .. }) if family == Family::V6 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

fn cleanup_family(family: Family) -> Result<bool, FallbackError> {
    let mut found = remove_jumps_in(family, JUMP_COMMENT)?;
    let filter = iptables_rules::our_chains(&save(family, "filter")?, "filter");
    let nat = iptables_rules::our_chains(&save(family, "nat")?, "nat");
    if !filter.is_empty() || !nat.is_empty() {
        found = true;
        let input = iptables_rules::render_cleanup(&filter, &nat);
        fallback::run(
            family.iptables_restore(),
            &["-w", "5", "--noflush"],
            Some(&input),
        )?;
    }
    // Nothing refers to the hairpin set once the chains are gone.
    let set = hairpin_set(family);
    if fallback::run("ipset", &["list", "-n", set], None).is_ok() {
        found = true;
        fallback::run("ipset", &["destroy", set], None)?;
    }
    if found {
        remove_empty_nft_builtins_in(family);
    }
    Ok(found)
}

/// Delete every rule of the filter and nat tables whose comment is exactly
/// `comment` (our jumps from the built-in chains), each by its saved spec
/// (iptables). Returns whether there was any.
pub(super) fn remove_jumps(comment: &str) -> Result<bool, FallbackError> {
    remove_jumps_in(Family::V4, comment)
}

fn remove_jumps_in(family: Family, comment: &str) -> Result<bool, FallbackError> {
    let mut found = false;
    for table in ["filter", "nat"] {
        for line in save(family, table)?.lines() {
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
            fallback::run(family.iptables(), &del, None)?;
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
/// built-in chains either way. (iptables.)
pub(super) fn remove_empty_nft_builtins() {
    remove_empty_nft_builtins_in(Family::V4)
}

fn remove_empty_nft_builtins_in(family: Family) {
    let nf_tables = fallback::run(family.iptables(), &["--version"], None)
        .is_ok_and(|v| v.contains("nf_tables"));
    if !nf_tables {
        return;
    }
    let nft_family = family.nft();
    for (table, chains) in [
        ("nat", &["PREROUTING", "OUTPUT", "POSTROUTING"][..]),
        ("filter", &["INPUT", "FORWARD", "OUTPUT"][..]),
    ] {
        for chain in chains {
            let Ok(list) = fallback::run("nft", &["list", "chain", nft_family, table, chain], None)
            else {
                continue;
            };
            if iptables_rules::is_empty_accept_base_chain(&list) {
                let _ = fallback::run("nft", &["delete", "chain", nft_family, table, chain], None);
            }
        }
        if let Ok(list) = fallback::run("nft", &["list", "table", nft_family, table], None)
            && !list.contains("chain ")
            && !list.contains("set ")
            && !list.contains("map ")
        {
            let _ = fallback::run("nft", &["delete", "table", nft_family, table], None);
        }
    }
}

/// What our chains and our ip set of the rules' family hold now.
fn read_state(rules: &IptablesRules) -> Result<State, FallbackError> {
    let family = rules.family;
    let mut found = iptables_rules::found(&save(family, "filter")?, "filter", rules);
    found.extend(iptables_rules::found(&save(family, "nat")?, "nat", rules));
    if let Ok(save) = fallback::run("ipset", &["save", hairpin_set(family)], None) {
        found.extend(iptables_rules::found_ipset(&save, rules));
    }
    Ok(State::adopt(found))
}

/// Creates the hairpin ip set of `family` unless it exists
/// (KUBE-POSTROUTING refers to it).
fn ensure_hairpin_set(family: Family) -> Result<(), FallbackError> {
    let mut args = vec!["create", hairpin_set(family)];
    args.extend(hairpin_set_type(family));
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

fn restore(family: Family, input: &str) -> Result<(), FallbackError> {
    debug!(
        bytes = input.len(),
        tool = family.iptables_restore(),
        "restore"
    );
    fallback::run(
        family.iptables_restore(),
        &["-w", "5", "--noflush"],
        Some(input),
    )
    .map(|_| ())
}

impl FamilyRules {
    /// Reads what an earlier run left in our chains of `family` (the
    /// first sync rewrites only what is wrong or missing there and deletes
    /// what is not wanted), writes the fixed chains if needed and installs
    /// the jumps.
    fn new(opts: RuleOptions, family: Family) -> Result<FamilyRules, FallbackError> {
        let rules = IptablesRules::new(opts, family);
        let mut state = read_state(&rules)?;
        let found = state.written_count();
        if found > 0 {
            info!(
                family = family.name(),
                items = found,
                "found chains of an earlier run; the first sync keeps what is right there"
            );
        }
        ensure_hairpin_set(family)?;
        // The jumps need the chains to exist: write the fixed ones first.
        let delta = state.plan_fixed(&rules);
        let (input, _) = iptables_rules::render(&delta);
        if !input.is_empty() {
            restore(family, &input)?;
        }
        state.commit(delta);
        ensure_jumps_in(family, &iptables_rules::jumps())?;
        Ok(FamilyRules {
            rules,
            state,
            full: true,
        })
    }

    /// Writes `delta` (hairpin entries, then rules, then stale hairpin
    /// entries); `n` counts (chains written, deleted, shared rules added,
    /// deleted, hairpin entries added, deleted).
    fn write(&self, delta: &Delta, n: &mut [usize; 6]) -> Result<(), FallbackError> {
        // Hairpin entries go in before the rules that DNAT to them, and
        // out after.
        let (set_add, set_del) = iptables_rules::render_ipset(delta);
        ipset_restore(&set_add)?;
        let is_rule = |i: &Item| !matches!(i, Item::Element(..));
        if delta.upsert.iter().any(|(i, _, _)| is_rule(i))
            || delta.delete.iter().any(|(i, _)| is_rule(i))
        {
            fallback::run_streamed(
                self.rules.family.iptables_restore(),
                &["-w", "5", "--noflush"],
                |out| {
                    let p = iptables_rules::render_to(out, delta);
                    n[0] += p.written.len();
                    n[1] += p.deleted.len();
                    n[2] += p.rules_added;
                    n[3] += p.rules_deleted;
                },
            )?;
        }
        ipset_restore(&set_del)?;
        n[4] += set_add.lines().count();
        n[5] += set_del.lines().count();
        Ok(())
    }
}

impl IptablesDataplane {
    /// Checks the tools work and sets up the rules of each family
    /// (iptables, and ip6tables unless it is missing or refused: then
    /// the IPv6 frontends are counted as left out).
    pub fn new(opts: RuleOptions) -> Result<IptablesDataplane, FallbackError> {
        let mut families = vec![FamilyRules::new(opts.clone(), Family::V4)?];
        let mut ipv6_left = None;
        match FamilyRules::new(opts, Family::V6) {
            Ok(f) => families.push(f),
            Err(e) => {
                warn!(error = %e, "no ip6tables: IPv6 frontends are not programmed");
                ipv6_left = Some(fallback::Ipv6Left::default());
            }
        }
        Ok(IptablesDataplane {
            programmed: LbTable::default(),
            families,
            ipv6_left,
            ticks: 0,
        })
    }
}

impl Dataplane for IptablesDataplane {
    type Error = FallbackError;

    fn mode(&self) -> &'static str {
        MODE
    }

    fn programmed(&self) -> &LbTable {
        &self.programmed
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, FallbackError> {
        let before = apply_in_place(&mut self.programmed, changes);
        // (chains written, deleted, shared rules added, deleted, hairpin
        // entries added, deleted)
        let mut n = [0usize; 6];
        let mut failed = None;
        for fam in &mut self.families {
            let family = fam.rules.family;
            let written = if fam.full {
                // Every item compared, written a chunk of frontends at a
                // time: the rules of 10k services are never all in memory.
                let mut state = std::mem::take(&mut fam.state);
                let r = state.plan_full_chunked(
                    &fam.rules,
                    &self.programmed.frontends,
                    CHUNK,
                    |delta| fam.write(&delta, &mut n).map(|()| true),
                );
                fam.state = state;
                r
            } else {
                // Only the changed frontends of this family.
                let mine: Vec<_> = before
                    .iter()
                    .filter(|(k, _)| family.has(k))
                    .cloned()
                    .collect();
                let delta = fam
                    .state
                    .plan(&fam.rules, &self.programmed.frontends, Some(&mine));
                let r = if delta.is_empty() {
                    Ok(())
                } else {
                    fam.write(&delta, &mut n)
                };
                if r.is_ok() {
                    fam.state.commit(delta);
                }
                r
            };
            match written {
                Ok(()) => fam.full = false,
                Err(e) => {
                    // Kernel state unknown now: re-read it, compare
                    // everything next time.
                    fam.state = read_state(&fam.rules).unwrap_or_default();
                    fam.full = true;
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
            written = n[0],
            deleted = n[1],
            rules_added = n[2],
            rules_deleted = n[3],
            hairpin_added = n[4],
            hairpin_deleted = n[5],
            "iptables chains"
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
        // Someone flushing the built-in chains drops our jumps: put them
        // back (every 30 ticks: each check is a process).
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(30) {
            for fam in &self.families {
                ensure_jumps_in(fam.rules.family, &iptables_rules::jumps())?;
            }
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
