//! The dataplane's backends: for every backend in `BACKENDS_V4` and
//! `BACKENDS_V6`, its id, flags and how many programmed frontends' lists
//! hold it.
//!
//! A million of these at 100,000 services x 10 endpoints, so the layout
//! counts: the entries are 16 bytes each (IPv4; 28 for IPv6, in a table of
//! their own so IPv4 ones stay 16) in one vector per family (a freed slot
//! is reused), and the hash index holds only each entry's position (4
//! bytes plus hashbrown's control byte per bucket). A
//! `HashMap<BackendIdentity, BackendEntry>` took 21 bytes per bucket; with
//! 2^21 buckets for a million backends, 44 MB where this takes about 27 MB.

use std::{
    hash::{BuildHasher, Hash, RandomState},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hashbrown::HashTable;

use super::{BackendEntry, BackendIdentity};

/// A backend's identity within one family's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key<A> {
    addr: A,
    port: u16,
    proto: u8,
}

/// One backend: what identifies it and what the dataplane keeps of it,
/// flat (a [`BackendIdentity`] next to a [`BackendEntry`] would take 20
/// bytes with their padding).
#[derive(Clone, Copy, Debug)]
struct Slot<A> {
    id: u32,
    refs: u32,
    addr: A,
    port: u16,
    proto: u8,
    flags: u8,
}

impl<A: Copy + Into<IpAddr>> Slot<A> {
    fn of(key: Key<A>, entry: BackendEntry) -> Slot<A> {
        Slot {
            id: entry.id,
            refs: entry.refs,
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            flags: entry.flags,
        }
    }

    fn key(&self) -> Key<A> {
        Key {
            addr: self.addr,
            port: self.port,
            proto: self.proto,
        }
    }

    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            addr: self.addr.into(),
            port: self.port,
            proto: self.proto,
        }
    }

    fn entry(&self) -> BackendEntry {
        BackendEntry {
            id: self.id,
            refs: self.refs,
            flags: self.flags,
        }
    }
}

/// Backends of one family by identity (see the module documentation).
#[derive(Debug)]
struct Table<A> {
    /// Positions in `slots`, hashed by the slot's key.
    index: HashTable<u32>,
    /// Entries; a freed one is in `free` (its content is stale).
    slots: Vec<Slot<A>>,
    free: Vec<u32>,
    hasher: RandomState,
}

impl<A> Default for Table<A> {
    fn default() -> Self {
        Table {
            index: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hasher: RandomState::new(),
        }
    }
}

impl<A: Copy + Eq + Hash + Into<IpAddr>> Table<A> {
    fn hash(&self, key: &Key<A>) -> u64 {
        self.hasher.hash_one(key)
    }

    fn position(&self, key: &Key<A>) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(self.hash(key), |&i| {
                slots.get(i as usize).is_some_and(|s| s.key() == *key)
            })
            .copied()
    }

    fn get(&self, key: &Key<A>) -> Option<BackendEntry> {
        let i = self.position(key)?;
        self.slots.get(i as usize).map(Slot::entry)
    }

    fn refs_mut(&mut self, key: &Key<A>) -> Option<&mut u32> {
        let i = self.position(key)?;
        self.slots.get_mut(i as usize).map(|s| &mut s.refs)
    }

    fn insert(&mut self, key: Key<A>, entry: BackendEntry) {
        let slot = Slot::of(key, entry);
        let hash = self.hash(&key);
        let (slots, hasher) = (&mut self.slots, &self.hasher);
        match self.index.entry(
            hash,
            |&i| slots.get(i as usize).is_some_and(|s| s.key() == key),
            |&j| hasher.hash_one(slots[j as usize].key()),
        ) {
            hashbrown::hash_table::Entry::Occupied(o) => slots[*o.get() as usize] = slot,
            hashbrown::hash_table::Entry::Vacant(v) => {
                let i = match self.free.pop() {
                    Some(i) => {
                        slots[i as usize] = slot;
                        i
                    }
                    None => {
                        slots.push(slot);
                        (slots.len() - 1) as u32
                    }
                };
                v.insert(i);
            }
        }
    }

    fn remove(&mut self, key: &Key<A>) -> Option<BackendEntry> {
        let hash = self.hash(key);
        let slots = &self.slots;
        let found = self.index.find_entry(hash, |&i| {
            slots.get(i as usize).is_some_and(|s| s.key() == *key)
        });
        let (i, _) = found.ok()?.remove();
        self.free.push(i);
        self.slots.get(i as usize).map(Slot::entry)
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn iter(&self) -> impl Iterator<Item = (BackendIdentity, BackendEntry)> + '_ {
        self.index.iter().filter_map(|&i| {
            self.slots
                .get(i as usize)
                .map(|s| (s.identity(), s.entry()))
        })
    }

    fn reserve(&mut self, n: usize) {
        let more = n.saturating_sub(self.len());
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .reserve(more, |&j| hasher.hash_one(slots[j as usize].key()));
        let spare = self.slots.capacity() - self.slots.len() + self.free.len();
        self.slots.reserve_exact(more.saturating_sub(spare));
    }
}

/// Every backend by identity: one [`Table`] per address family.
#[derive(Debug, Default)]
pub(super) struct Backends {
    v4: Table<Ipv4Addr>,
    v6: Table<Ipv6Addr>,
}

/// The family's key of an identity.
enum FamilyKey {
    V4(Key<Ipv4Addr>),
    V6(Key<Ipv6Addr>),
}

fn family_key(i: &BackendIdentity) -> FamilyKey {
    match i.addr {
        IpAddr::V4(addr) => FamilyKey::V4(Key {
            addr,
            port: i.port,
            proto: i.proto,
        }),
        IpAddr::V6(addr) => FamilyKey::V6(Key {
            addr,
            port: i.port,
            proto: i.proto,
        }),
    }
}

impl Backends {
    pub fn get(&self, identity: &BackendIdentity) -> Option<BackendEntry> {
        match family_key(identity) {
            FamilyKey::V4(k) => self.v4.get(&k),
            FamilyKey::V6(k) => self.v6.get(&k),
        }
    }

    /// The reference count of `identity`, to change.
    pub fn refs_mut(&mut self, identity: &BackendIdentity) -> Option<&mut u32> {
        match family_key(identity) {
            FamilyKey::V4(k) => self.v4.refs_mut(&k),
            FamilyKey::V6(k) => self.v6.refs_mut(&k),
        }
    }

    /// Insert or replace the entry of `identity`.
    pub fn insert(&mut self, identity: BackendIdentity, entry: BackendEntry) {
        match family_key(&identity) {
            FamilyKey::V4(k) => self.v4.insert(k, entry),
            FamilyKey::V6(k) => self.v6.insert(k, entry),
        }
    }

    pub fn remove(&mut self, identity: &BackendIdentity) -> Option<BackendEntry> {
        match family_key(identity) {
            FamilyKey::V4(k) => self.v4.remove(&k),
            FamilyKey::V6(k) => self.v6.remove(&k),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Every backend (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (BackendIdentity, BackendEntry)> + '_ {
        self.v4.iter().chain(self.v6.iter())
    }

    /// Room for `n` backends in all, so a full sync does not grow the
    /// tables while it fills them (a table that doubles holds both copies
    /// for a moment). The room goes to IPv4, the family most backends
    /// are of; the IPv6 table grows as it fills.
    pub fn reserve(&mut self, n: usize) {
        self.v4.reserve(n.saturating_sub(self.v6.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_kept_apart() {
        let mut b = Backends::default();
        let v6 = |last: u16| BackendIdentity {
            addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last)),
            port: 80,
            proto: 6,
        };
        b.insert(id(1, 80), entry(1, 1));
        b.insert(v6(1), entry(2, 2));
        b.insert(v6(2), entry(3, 0));
        assert_eq!(b.len(), 3);
        assert_eq!((b.v4.len(), b.v6.len()), (1, 2));
        assert_eq!(b.get(&v6(1)).map(|e| e.id), Some(2));
        if let Some(r) = b.refs_mut(&v6(1)) {
            *r += 1;
        }
        assert_eq!(b.get(&v6(1)).map(|e| e.refs), Some(3));
        let mut ids: Vec<(IpAddr, u32)> = b.iter().map(|(k, e)| (k.addr, e.id)).collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            vec![(id(1, 80).addr, 1), (v6(1).addr, 2), (v6(2).addr, 3)]
        );
        assert_eq!(b.remove(&v6(2)).map(|e| e.id), Some(3));
        assert!(b.get(&v6(2)).is_none());
        assert_eq!(b.get(&id(1, 80)).map(|e| e.id), Some(1));
    }

    fn id(last: u8, port: u16) -> BackendIdentity {
        BackendIdentity {
            addr: Ipv4Addr::new(10, 0, 0, last).into(),
            port,
            proto: 6,
        }
    }

    fn entry(id: u32, refs: u32) -> BackendEntry {
        BackendEntry { id, refs, flags: 0 }
    }

    #[test]
    fn insert_replace_remove_and_reuse() {
        let mut b = Backends::default();
        b.reserve(3);
        b.insert(id(1, 80), entry(1, 0));
        b.insert(id(2, 80), entry(2, 1));
        b.insert(id(1, 81), entry(3, 2));
        assert_eq!(b.len(), 3);
        assert_eq!(b.get(&id(2, 80)).map(|e| e.id), Some(2));
        b.insert(id(2, 80), entry(2, 5));
        assert_eq!(b.len(), 3, "replaced, not added");
        assert_eq!(b.get(&id(2, 80)).map(|e| e.refs), Some(5));
        if let Some(r) = b.refs_mut(&id(1, 81)) {
            *r += 1;
        }
        assert_eq!(b.get(&id(1, 81)).map(|e| e.refs), Some(3));
        assert_eq!(b.remove(&id(1, 80)).map(|e| e.id), Some(1));
        assert_eq!(b.remove(&id(1, 80)).map(|e| e.id), None);
        assert!(b.get(&id(1, 80)).is_none());
        assert_eq!(b.len(), 2);
        b.insert(id(3, 80), entry(4, 0));
        assert_eq!(b.v4.slots.len(), 3, "the freed slot is reused");
        let mut all: Vec<(u8, u16, u32)> = b
            .iter()
            .map(|(k, e)| {
                let IpAddr::V4(a) = k.addr else {
                    panic!("an IPv6 backend in an IPv4 test: {k:?}")
                };
                (a.octets()[3], k.port, e.id)
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all, vec![(1, 81, 3), (2, 80, 2), (3, 80, 4)]);
    }

    #[test]
    fn the_entries_are_small() {
        assert_eq!(std::mem::size_of::<Slot<Ipv4Addr>>(), 16);
        assert_eq!(std::mem::size_of::<Slot<Ipv6Addr>>(), 28);
    }

    #[test]
    fn many_backends_grow_and_shrink() {
        let mut b = Backends::default();
        for i in 0..5000u32 {
            b.insert(
                BackendIdentity {
                    addr: Ipv4Addr::from(i).into(),
                    port: 1,
                    proto: 17,
                },
                entry(i, i),
            );
        }
        for i in (0..5000u32).step_by(2) {
            let k = BackendIdentity {
                addr: Ipv4Addr::from(i).into(),
                port: 1,
                proto: 17,
            };
            assert_eq!(b.remove(&k).map(|e| e.id), Some(i));
        }
        assert_eq!(b.len(), 2500);
        for i in 0..5000u32 {
            let k = BackendIdentity {
                addr: Ipv4Addr::from(i).into(),
                port: 1,
                proto: 17,
            };
            assert_eq!(b.get(&k).map(|e| e.refs), (i % 2 == 1).then_some(i));
        }
    }
}
