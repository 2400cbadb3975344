//! The incremental writer both fallback modes share: what our rules consist
//! of ([`Item`]s: whole chains, single rules of a chain several frontends
//! share, map/set elements, sets), who wants each one (the frontends that
//! contribute it), and a fingerprint of what the kernel holds for it. A
//! sync regenerates only the items of the frontends that changed and
//! writes only those whose fingerprint differs; no rule text is kept
//! (except the text of shared-chain rules, which is what deletes them).
//!
//! Fingerprints are hashes of the *normalised* content (the mode's
//! [`Generator::fingerprint`]), so the same hash comes from generated
//! rules and from rules as the kernel lists them: an agent that starts
//! where an earlier one left reads the kernel ([`State::adopt`]) and its
//! first sync writes only what is missing or wrong.
//!
//! Pure: no kernel, no processes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU64,
};

use crate::{
    lb::{Frontend, FrontendKey},
    model::Protocol,
};

/// One thing a fallback mode programs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Item {
    /// A chain we own wholly: (table, name). nftables uses table "".
    Chain(&'static str, Box<str>),
    /// One rule of a chain that holds rules of many frontends (iptables'
    /// `KUBE-SERVICES`): (table, chain, hash of the normalised rule).
    Rule(&'static str, &'static str, u64),
    /// An element of a map or set: (container, key).
    Element(&'static str, Box<str>),
    /// A named set (nftables affinity sets): its name.
    Set(Box<str>),
}

/// An item's generated content: for a chain its base-chain declaration and
/// rules, for a shared-chain rule its text, for an element its value (if
/// any), for a set its declaration body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Content {
    pub hook: Option<&'static str>,
    pub lines: Vec<String>,
}

impl Content {
    pub fn rules(lines: Vec<String>) -> Content {
        Content { hook: None, lines }
    }
}

/// A mode's rules, one frontend at a time.
pub trait Generator {
    /// Items that exist whatever the frontends.
    fn fixed(&self) -> Vec<(Item, Content)>;
    /// The items one frontend contributes, appended to `out`.
    fn frontend(&self, k: &FrontendKey, f: &Frontend, out: &mut Vec<(Item, Content)>);
    /// Hash of `c` in a form the kernel's listing normalises to as well.
    fn fingerprint(&self, item: &Item, c: &Content) -> u64;
}

/// A stable 64-bit hash of `parts` (within one build: fingerprints are
/// never stored outside the process).
pub fn hash_lines<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// An IPv4 frontend as an item's owner holds it: 8 bytes (a
/// [`FrontendKey`] takes 20 with its `IpAddr`). Ordered as the
/// `FrontendKey`s it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct OwnerKey {
    addr: Ipv4Addr,
    port: u16,
    proto: Protocol,
}

impl OwnerKey {
    /// None for an IPv6 frontend (held boxed: [`Owners::OneV6`]).
    fn of(k: &FrontendKey) -> Option<OwnerKey> {
        match k.addr {
            IpAddr::V4(addr) => Some(OwnerKey {
                addr,
                port: k.port,
                proto: k.proto,
            }),
            IpAddr::V6(_) => None,
        }
    }

    fn key(self) -> FrontendKey {
        FrontendKey {
            addr: self.addr.into(),
            port: self.port,
            proto: self.proto,
        }
    }
}

/// Who wants an item: nobody, the mode itself (a fixed item), or the
/// frontends contributing it (nearly always one). 16 bytes: there is one
/// per item, ~120k at 10k services x 10 endpoints.
#[derive(Clone, Debug, Default)]
enum Owners {
    #[default]
    None,
    Fixed,
    One(OwnerKey),
    /// One IPv6 frontend: boxed, so that the IPv4 case stays small.
    OneV6(Box<FrontendKey>),
    /// Boxed: a `Vec` inline would make every slot 8 bytes bigger, for
    /// the few items several frontends share.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<FrontendKey>>),
}

impl Owners {
    fn single(k: FrontendKey) -> Owners {
        match OwnerKey::of(&k) {
            Some(o) => Owners::One(o),
            None => Owners::OneV6(Box::new(k)),
        }
    }

    fn only(&self) -> Option<FrontendKey> {
        match self {
            Owners::One(o) => Some(o.key()),
            Owners::OneV6(k) => Some(**k),
            _ => None,
        }
    }

    /// `k` contributes (a fixed item stays the mode's).
    fn add(&mut self, k: FrontendKey) {
        *self = match std::mem::take(self) {
            Owners::None => Owners::single(k),
            Owners::Fixed => Owners::Fixed,
            Owners::Many(mut v) => {
                if !v.contains(&k) {
                    v.push(k);
                }
                Owners::Many(v)
            }
            one => match one.only() {
                Some(o) if o == k => one,
                Some(o) => Owners::Many(Box::new(vec![o, k])),
                None => one,
            },
        }
    }

    fn remove(&mut self, k: &FrontendKey) {
        *self = match std::mem::take(self) {
            Owners::Many(mut v) => {
                v.retain(|o| o != k);
                match v.len() {
                    0 => Owners::None,
                    1 => Owners::single(v[0]),
                    _ => Owners::Many(v),
                }
            }
            one if one.only() == Some(*k) => Owners::None,
            other => other,
        }
    }

    /// The contributor whose content wins (the greatest key, as a full
    /// generation in key order would leave it).
    fn winner(&self) -> Option<FrontendKey> {
        match self {
            Owners::None | Owners::Fixed => None,
            Owners::Many(v) => v.iter().max().copied(),
            one => one.only(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Owners::None)
    }

    fn is_fixed(&self) -> bool {
        matches!(self, Owners::Fixed)
    }
}

/// A fingerprint as kept: never zero, so that "not written" costs no
/// extra word (0 and 1 are the same fingerprint; a 2^-63 collision).
fn kept(fp: u64) -> NonZeroU64 {
    NonZeroU64::new(fp).unwrap_or(NonZeroU64::MIN)
}

/// One item: 24 bytes besides its key (a shared-chain rule's text is
/// kept apart, in [`State::texts`]).
#[derive(Clone, Debug, Default)]
struct Slot {
    /// Fingerprint of what the kernel holds ([`kept`]); None: not there.
    written: Option<NonZeroU64>,
    owners: Owners,
}

impl Slot {
    fn holds(&self, fp: u64) -> bool {
        self.written == Some(kept(fp))
    }
}

/// Something the kernel holds, as read from it at start.
#[derive(Clone, Debug)]
pub struct Found {
    pub item: Item,
    pub fingerprint: u64,
    /// For [`Item::Rule`]: the rule's text as listed.
    pub text: Option<String>,
}

/// What one sync writes: items to (re)write with their content and
/// fingerprint, items to delete (with a shared rule's text), and the chains
/// whose rewrite flushed shared rules (re-added among the upserts).
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub upsert: Vec<(Item, Content, u64)>,
    /// Whether each upserted item is there already (a chain to flush, an
    /// element to delete before re-adding).
    pub existed: Vec<bool>,
    pub delete: Vec<(Item, Option<Box<str>>)>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }

    /// What [`State::commit`] needs of this delta: the items, their
    /// fingerprints and, for shared-chain rules, their text (the rest of
    /// the content is not kept).
    pub fn clone_items(&self) -> Delta {
        Delta {
            upsert: self
                .upsert
                .iter()
                .map(|(i, c, fp)| {
                    let c = match i {
                        Item::Rule(..) => c.clone(),
                        _ => Content::default(),
                    };
                    (i.clone(), c, *fp)
                })
                .collect(),
            existed: self.existed.clone(),
            delete: self.delete.clone(),
        }
    }
}

/// Puts `a[order[i]]` (and `b[order[i]]`) at `i`, by swaps (`order` is
/// used up).
fn permute<A, B>(a: &mut [A], b: &mut [B], order: &mut [usize]) {
    for i in 0..order.len() {
        // Follow the cycle starting at i, marking done slots.
        let mut cur = i;
        while order[cur] != usize::MAX {
            let next = order[cur];
            order[cur] = usize::MAX;
            if next == i || order[next] == usize::MAX {
                break;
            }
            a.swap(cur, next);
            b.swap(cur, next);
            cur = next;
        }
    }
}

/// Sorts `delta` by item: deterministic output, and the order the
/// renderers rely on (in place: the upserts may hold many rules).
fn sort(delta: &mut Delta) {
    let mut order: Vec<usize> = (0..delta.upsert.len()).collect();
    order.sort_unstable_by(|a, b| delta.upsert[*a].0.cmp(&delta.upsert[*b].0));
    permute(&mut delta.upsert, &mut delta.existed, &mut order);
    delta.delete.sort_by(|a, b| a.0.cmp(&b.0));
}

/// What is written and who wants what.
///
/// Memory: one slot per item, ~120k at 10k services x 10 endpoints (most
/// of them hairpin set elements). A B-tree, not a hash map: at that size a
/// hash table sits at its 2^18 buckets (46% full) and doubles through a
/// copy while the first sync fills it; measured with the items of 10k
/// services x 10 endpoints (iptables), 24.1 MiB held and 30.9 MiB at the
/// peak of the first sync with a hash map, 20.1 and 26.2 with the B-tree
/// (and 35.7 and 48.3 with the slot's former 72 bytes: text and a fixed
/// flag in every slot); the first sync's planning time is the same.
#[derive(Clone, Debug, Default)]
pub struct State {
    slots: BTreeMap<Item, Slot>,
    /// The text of each written shared-chain rule ([`Item::Rule`]) as the
    /// kernel has it: what deletes it.
    texts: HashMap<Item, Box<str>>,
}

/// Which frontends changed in a sync: key and the frontend before (None:
/// new). The frontend after is in the table handed to [`State::plan`].
pub type Changed = [(FrontendKey, Option<Frontend>)];

impl State {
    /// The kernel holds `found` (read at start).
    pub fn adopt(found: Vec<Found>) -> State {
        let mut slots = BTreeMap::new();
        let mut texts = HashMap::new();
        for f in found {
            if let Some(t) = f.text {
                texts.insert(f.item.clone(), t.into_boxed_str());
            }
            slots.insert(
                f.item,
                Slot {
                    written: Some(kept(f.fingerprint)),
                    owners: Owners::None,
                },
            );
        }
        State { slots, texts }
    }

    /// Only the fixed items (at start, before the jumps into them go in):
    /// what is missing or wrong among them; nothing else is touched.
    pub fn plan_fixed<G: Generator>(&mut self, g: &G) -> Delta {
        let mut delta = Delta::default();
        self.fixed_into(g, &mut delta);
        delta
    }

    fn fixed_into<G: Generator>(&mut self, g: &G, delta: &mut Delta) {
        for (item, c) in g.fixed() {
            let fp = g.fingerprint(&item, &c);
            let slot = self.slots.entry(item.clone()).or_default();
            slot.owners = Owners::Fixed;
            if slot.holds(fp) {
                continue;
            }
            let existed = slot.written.is_some();
            if existed && let Item::Chain(table, chain) = &item {
                // Declaring it flushes it: its shared rules go too.
                for (i, s) in self.slots.iter_mut() {
                    if matches!(i, Item::Rule(t, c, _) if t == table && **c == **chain) {
                        s.written = None;
                    }
                }
                self.texts.retain(
                    |i, _| !matches!(i, Item::Rule(t, c, _) if t == table && **c == **chain),
                );
            }
            delta.upsert.push((item, c, fp));
            delta.existed.push(existed);
        }
    }

    /// The delta taking the kernel to the rules of `table`: with `changed`,
    /// only those frontends' items are looked at; without, every item
    /// (first sync, or after a failed write: what the kernel holds was
    /// re-read with [`State::adopt`]).
    pub fn plan<G: Generator>(
        &mut self,
        g: &G,
        table: &BTreeMap<FrontendKey, Frontend>,
        changed: Option<&Changed>,
    ) -> Delta {
        let mut delta = Delta::default();
        match changed {
            None => {
                let never = self.plan_full_chunked(g, table, usize::MAX, |d| {
                    delta = d;
                    Ok::<bool, std::convert::Infallible>(false)
                });
                // The one chunk was the whole table.
                let Ok(_) = never;
                delta
            }
            Some(changed) => {
                self.plan_changed(g, table, changed, &mut delta);
                sort(&mut delta);
                delta
            }
        }
    }

    /// [`State::plan`] comparing every item, written in chunks of about
    /// `chunk` frontends: `write` gets each chunk's delta (fixed items in
    /// the first, deletions in the last) and says whether it was written
    /// (then it is committed); an error stops there. Two passes over the
    /// frontends, so that no item's content is held but the current
    /// chunk's: who wants each item (the greatest key's content wins, as
    /// generating in key order would leave it), then each winner's
    /// content, fingerprinted. A first sync at 10k services holds one
    /// chunk's rules, not all of them.
    pub fn plan_full_chunked<G: Generator, E>(
        &mut self,
        g: &G,
        table: &BTreeMap<FrontendKey, Frontend>,
        chunk: usize,
        mut write: impl FnMut(Delta) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut delta = Delta::default();
        self.fixed_into(g, &mut delta);
        for s in self.slots.values_mut() {
            if !s.owners.is_fixed() {
                s.owners = Owners::None;
            }
        }
        let mut buf = Vec::new();
        for (k, f) in table {
            g.frontend(k, f, &mut buf);
            for (item, _) in buf.drain(..) {
                match self.slots.get_mut(&item) {
                    Some(s) => s.owners.add(*k),
                    None => {
                        let mut s = Slot::default();
                        s.owners.add(*k);
                        self.slots.insert(item, s);
                    }
                }
            }
        }
        let mut in_chunk = 0;
        for (k, f) in table {
            g.frontend(k, f, &mut buf);
            for (item, c) in buf.drain(..) {
                let Some(slot) = self.slots.get(&item) else {
                    continue;
                };
                if slot.owners.winner() != Some(*k) {
                    continue;
                }
                let fp = g.fingerprint(&item, &c);
                if !slot.holds(fp) {
                    delta.existed.push(slot.written.is_some());
                    delta.upsert.push((item, c, fp));
                }
            }
            in_chunk += 1;
            if in_chunk >= chunk && !delta.is_empty() {
                in_chunk = 0;
                sort(&mut delta);
                let d = std::mem::take(&mut delta);
                let kept = d.clone_items();
                if write(d)? {
                    self.commit(kept);
                }
            }
        }
        // Nobody wants these: delete what is written, forget the rest.
        for (item, slot) in &self.slots {
            if slot.owners.is_empty() && slot.written.is_some() {
                delta
                    .delete
                    .push((item.clone(), self.texts.get(item).cloned()));
            }
        }
        self.slots
            .retain(|_, s| !s.owners.is_empty() || s.written.is_some());
        sort(&mut delta);
        let kept = delta.clone_items();
        if write(delta)? {
            self.commit(kept);
        }
        Ok(())
    }

    /// Only the items of the `changed` frontends (before and after).
    fn plan_changed<G: Generator>(
        &mut self,
        g: &G,
        table: &BTreeMap<FrontendKey, Frontend>,
        changed: &Changed,
        delta: &mut Delta,
    ) {
        // Content generated this sync, with the key that generated it.
        let mut fresh: HashMap<Item, (FrontendKey, Content)> = HashMap::new();
        let mut buf = Vec::new();
        let mut affected = HashSet::new();
        for (k, old) in changed {
            if let Some(old) = old {
                g.frontend(k, old, &mut buf);
                for (item, _) in buf.drain(..) {
                    if let Some(s) = self.slots.get_mut(&item) {
                        s.owners.remove(k);
                    }
                    affected.insert(item);
                }
            }
        }
        for (k, _) in changed {
            if let Some(new) = table.get(k) {
                g.frontend(k, new, &mut buf);
                for (item, c) in buf.drain(..) {
                    self.slots.entry(item.clone()).or_default().owners.add(*k);
                    affected.insert(item.clone());
                    match fresh.get(&item) {
                        Some((o, _)) if o > k => {}
                        _ => {
                            fresh.insert(item, (*k, c));
                        }
                    }
                }
            }
        }
        for item in affected {
            let Some(slot) = self.slots.get(&item) else {
                continue;
            };
            if slot.owners.is_fixed() {
                continue;
            }
            let desired = match slot.owners.winner() {
                None => None,
                Some(o) => match fresh.remove(&item) {
                    Some((k, c)) if k == o => Some(c),
                    _ => table.get(&o).and_then(|f| {
                        // An unchanged contributor of a shared item.
                        g.frontend(&o, f, &mut buf);
                        let c = buf.drain(..).find(|(i, _)| *i == item).map(|(_, c)| c);
                        buf.clear();
                        c
                    }),
                },
            };
            match desired {
                Some(c) => {
                    let fp = g.fingerprint(&item, &c);
                    if !slot.holds(fp) {
                        delta.existed.push(slot.written.is_some());
                        delta.upsert.push((item, c, fp));
                    }
                }
                None => {
                    if slot.written.is_some() {
                        let text = self.texts.get(&item).cloned();
                        delta.delete.push((item.clone(), text));
                    } else if slot.owners.is_empty() {
                        self.slots.remove(&item);
                    }
                }
            }
        }
    }

    /// The kernel now holds what `delta` wrote.
    pub fn commit(&mut self, delta: Delta) {
        for (item, c, fp) in delta.upsert {
            if let Item::Rule(..) = item {
                match c.lines.into_iter().next() {
                    Some(t) => self.texts.insert(item.clone(), t.into_boxed_str()),
                    None => self.texts.remove(&item),
                };
            }
            self.slots.entry(item).or_default().written = Some(kept(fp));
        }
        for (item, _) in delta.delete {
            self.texts.remove(&item);
            if let Some(slot) = self.slots.get_mut(&item) {
                slot.written = None;
                if slot.owners.is_empty() {
                    self.slots.remove(&item);
                }
            }
        }
    }

    /// What this writer believes the kernel holds: item -> fingerprint.
    pub fn believed(&self) -> BTreeMap<Item, u64> {
        self.slots
            .iter()
            .filter_map(|(i, s)| s.written.map(|fp| (i.clone(), fp.get())))
            .collect()
    }

    /// How many items are written.
    pub fn written_count(&self) -> usize {
        self.slots.values().filter(|s| s.written.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_pick_the_greatest_key() {
        let k = |p| FrontendKey {
            addr: std::net::Ipv4Addr::new(10, 0, 0, 1).into(),
            port: p,
            proto: crate::model::Protocol::Tcp,
        };
        let mut o = Owners::default();
        o.add(k(2));
        o.add(k(5));
        o.add(k(3));
        assert_eq!(o.winner(), Some(k(5)));
        o.remove(&k(5));
        assert_eq!(o.winner(), Some(k(3)));
        o.remove(&k(3));
        o.remove(&k(2));
        assert!(o.is_empty());
        // The mode's own items stay its own.
        let mut f = Owners::Fixed;
        f.add(k(1));
        f.remove(&k(1));
        assert!(f.is_fixed() && !f.is_empty() && f.winner().is_none());
        // IPv6 frontends own items as well.
        let six = |p| FrontendKey {
            addr: "fd00:96::1".parse().expect("address"),
            port: p,
            proto: crate::model::Protocol::Tcp,
        };
        let mut o = Owners::default();
        o.add(six(2));
        assert_eq!(o.winner(), Some(six(2)));
        o.add(six(7));
        o.add(six(2));
        assert_eq!(o.winner(), Some(six(7)));
        o.remove(&six(7));
        assert_eq!(o.winner(), Some(six(2)));
        assert!(matches!(o, Owners::OneV6(_)));
        o.remove(&six(2));
        assert!(o.is_empty());
    }

    /// One slot per item, ~120k at 10k services x 10 endpoints: every
    /// byte here is ~0.1 MiB there (tests/fallback_memory.rs counts the
    /// whole state).
    #[test]
    fn slots_stay_small() {
        assert!(std::mem::size_of::<Owners>() <= 16);
        assert!(std::mem::size_of::<Slot>() <= 24);
        assert!(std::mem::size_of::<Item>() <= 48);
    }

    #[test]
    fn rule_text_kept_while_written() {
        let item = Item::Rule("nat", "KUBE-SERVICES", 7);
        let mut s = State::default();
        s.commit(Delta {
            upsert: vec![(item.clone(), Content::rules(vec!["-j X".into()]), 7)],
            existed: vec![false],
            delete: vec![],
        });
        assert_eq!(s.texts.get(&item).map(|t| &**t), Some("-j X"));
        assert_eq!(s.believed().len(), 1);
        s.commit(Delta {
            delete: vec![(item.clone(), None)],
            ..Delta::default()
        });
        assert!(s.texts.is_empty() && s.slots.is_empty());
    }
}
#[cfg(test)]
mod permute_tests {
    #[test]
    fn permute_sorts_both() {
        let mut a = vec![30, 10, 50, 20, 40];
        let mut b = vec!['c', 'a', 'e', 'b', 'd'];
        let mut order: Vec<usize> = (0..a.len()).collect();
        order.sort_by_key(|i| a[*i]);
        super::permute(&mut a, &mut b, &mut order);
        assert_eq!(a, vec![10, 20, 30, 40, 50]);
        assert_eq!(b, vec!['a', 'b', 'c', 'd', 'e']);
    }
}
