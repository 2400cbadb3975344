//! The dataplane's backends: for every backend in `BACKENDS_V4`, its id,
//! flags and how many programmed frontends' lists hold it.
//!
//! A million of these at 100,000 services x 10 endpoints, so the layout
//! counts: the entries are 16 bytes each in one vector (a freed slot is
//! reused), and the hash index holds only each entry's position (4 bytes
//! plus hashbrown's control byte per bucket). A `HashMap<BackendIdentity,
//! BackendEntry>` took 21 bytes per bucket; with 2^21 buckets for a
//! million backends, 44 MB where this takes about 27 MB.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::{BackendEntry, BackendIdentity};

/// One backend: what identifies it and what the dataplane keeps of it,
/// flat (a [`BackendIdentity`] next to a [`BackendEntry`] would take 20
/// bytes with their padding).
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    refs: u32,
    addr: std::net::Ipv4Addr,
    port: u16,
    proto: u8,
    flags: u8,
}

impl Slot {
    fn of(identity: BackendIdentity, entry: BackendEntry) -> Slot {
        Slot {
            id: entry.id,
            refs: entry.refs,
            addr: identity.addr,
            port: identity.port,
            proto: identity.proto,
            flags: entry.flags,
        }
    }

    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            addr: self.addr,
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

/// Backends by identity (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct Backends {
    /// Positions in `slots`, hashed by the slot's identity.
    index: HashTable<u32>,
    /// Entries; a freed one is in `free` (its content is stale).
    slots: Vec<Slot>,
    free: Vec<u32>,
    hasher: RandomState,
}

impl Backends {
    fn hash(&self, identity: &BackendIdentity) -> u64 {
        self.hasher.hash_one(identity)
    }

    fn position(&self, identity: &BackendIdentity) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(self.hash(identity), |&i| {
                slots
                    .get(i as usize)
                    .is_some_and(|s| s.identity() == *identity)
            })
            .copied()
    }

    pub fn get(&self, identity: &BackendIdentity) -> Option<BackendEntry> {
        let i = self.position(identity)?;
        self.slots.get(i as usize).map(Slot::entry)
    }

    /// The reference count of `identity`, to change.
    pub fn refs_mut(&mut self, identity: &BackendIdentity) -> Option<&mut u32> {
        let i = self.position(identity)?;
        self.slots.get_mut(i as usize).map(|s| &mut s.refs)
    }

    /// Insert or replace the entry of `identity`.
    pub fn insert(&mut self, identity: BackendIdentity, entry: BackendEntry) {
        let slot = Slot::of(identity, entry);
        let hash = self.hash(&identity);
        let (slots, hasher) = (&mut self.slots, &self.hasher);
        match self.index.entry(
            hash,
            |&i| {
                slots
                    .get(i as usize)
                    .is_some_and(|s| s.identity() == identity)
            },
            |&j| hasher.hash_one(slots[j as usize].identity()),
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

    pub fn remove(&mut self, identity: &BackendIdentity) -> Option<BackendEntry> {
        let hash = self.hash(identity);
        let slots = &self.slots;
        let found = self.index.find_entry(hash, |&i| {
            slots
                .get(i as usize)
                .is_some_and(|s| s.identity() == *identity)
        });
        let (i, _) = found.ok()?.remove();
        self.free.push(i);
        self.slots.get(i as usize).map(Slot::entry)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Every backend (in no particular order).
    pub fn iter(&self) -> impl Iterator<Item = (BackendIdentity, BackendEntry)> + '_ {
        self.index.iter().filter_map(|&i| {
            self.slots
                .get(i as usize)
                .map(|s| (s.identity(), s.entry()))
        })
    }

    /// Room for `n` backends in all, so a full sync does not grow the
    /// tables while it fills them (a table that doubles holds both copies
    /// for a moment).
    pub fn reserve(&mut self, n: usize) {
        let more = n.saturating_sub(self.len());
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .reserve(more, |&j| hasher.hash_one(slots[j as usize].identity()));
        let spare = self.slots.capacity() - self.slots.len() + self.free.len();
        self.slots.reserve_exact(more.saturating_sub(spare));
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn id(last: u8, port: u16) -> BackendIdentity {
        BackendIdentity {
            addr: Ipv4Addr::new(10, 0, 0, last),
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
        assert_eq!(b.slots.len(), 3, "the freed slot is reused");
        let mut all: Vec<(u8, u16, u32)> = b
            .iter()
            .map(|(k, e)| (k.addr.octets()[3], k.port, e.id))
            .collect();
        all.sort_unstable();
        assert_eq!(all, vec![(1, 81, 3), (2, 80, 2), (3, 80, 4)]);
    }

    #[test]
    fn the_entries_are_small() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn many_backends_grow_and_shrink() {
        let mut b = Backends::default();
        for i in 0..5000u32 {
            b.insert(
                BackendIdentity {
                    addr: Ipv4Addr::from(i),
                    port: 1,
                    proto: 17,
                },
                entry(i, i),
            );
        }
        for i in (0..5000u32).step_by(2) {
            let k = BackendIdentity {
                addr: Ipv4Addr::from(i),
                port: 1,
                proto: 17,
            };
            assert_eq!(b.remove(&k).map(|e| e.id), Some(i));
        }
        assert_eq!(b.len(), 2500);
        for i in 0..5000u32 {
            let k = BackendIdentity {
                addr: Ipv4Addr::from(i),
                port: 1,
                proto: 17,
            };
            assert_eq!(b.get(&k).map(|e| e.refs), (i % 2 == 1).then_some(i));
        }
    }
}
