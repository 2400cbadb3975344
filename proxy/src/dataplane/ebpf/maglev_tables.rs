//! Maglev tables shared by frontends: who owns each `MAGLEV_V4` entry.
//!
//! A table is the backend id of each of its `M` slots. Its content depends
//! only on the frontend's backend list and `M`, so the frontends of one
//! service port (NodePort on each node address, LoadBalancer IPs,
//! ExternalIPs) share one table: one table per distinct (backend id list,
//! `M`), keyed by a table id (`MaglevKey::table_id`,
//! `ServiceValue::maglev_table`) and reference-counted by the frontends
//! pointing at it. The dataplane writes a table's slots before the first
//! service entry that points at it, and deletes all `M` of them after the
//! last frontend stops using it.
//!
//! This registry holds no map handle: the dataplane does the writes and
//! tells it what happened. Ids of freed tables are reused.

use std::collections::HashMap;

/// What identifies a table's content: the backend ids in frontend order and
/// the table size `M`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableKey {
    pub backend_ids: Vec<u32>,
    pub size: u32,
}

#[derive(Clone, Debug)]
struct Table {
    key: TableKey,
    /// Frontends pointing at it.
    users: usize,
}

/// The table registry.
#[derive(Debug, Default)]
pub struct MaglevTables {
    by_key: HashMap<TableKey, u32>,
    tables: HashMap<u32, Table>,
    free: Vec<u32>,
    next_id: u32,
}

impl MaglevTables {
    pub fn new() -> MaglevTables {
        MaglevTables {
            next_id: 1,
            ..Default::default()
        }
    }

    /// The id of the table with this content, if one exists.
    pub fn find(&self, key: &TableKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The content key of table `id`.
    pub fn key(&self, id: u32) -> Option<&TableKey> {
        self.tables.get(&id).map(|t| &t.key)
    }

    /// One more frontend uses existing table `id`.
    pub fn retain(&mut self, id: u32) {
        if let Some(t) = self.tables.get_mut(&id) {
            t.users += 1;
        }
    }

    /// An id for a new table (not yet registered: write its slots, then
    /// [`MaglevTables::register`] it).
    pub fn allocate(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            return id;
        }
        // Skip ids an adopted table holds.
        while self.next_id == 0 || self.tables.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// An allocated id whose slots could not be written goes back.
    pub fn unallocate(&mut self, id: u32) {
        if !self.tables.contains_key(&id) {
            self.free.push(id);
        }
    }

    /// Table `id` now holds `key`'s content, used by `users` frontends.
    pub fn register(&mut self, id: u32, key: TableKey, users: usize) {
        self.by_key.insert(key.clone(), id);
        self.tables.insert(id, Table { key, users });
    }

    /// A frontend stopped using table `id`. Returns the table's size when
    /// it was the last user: the caller deletes its `M` slots and the id is
    /// free again.
    pub fn release(&mut self, id: u32) -> Option<u32> {
        let t = self.tables.get_mut(&id)?;
        t.users = t.users.saturating_sub(1);
        if t.users > 0 {
            return None;
        }
        let t = self.tables.remove(&id)?;
        if self.by_key.get(&t.key) == Some(&id) {
            self.by_key.remove(&t.key);
        }
        self.free.push(id);
        Some(t.key.size)
    }

    /// Tables in use.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Frontends using table `id` (0: unknown).
    pub fn users(&self, id: u32) -> usize {
        self.tables.get(&id).map(|t| t.users).unwrap_or(0)
    }

    /// Sum of the sizes of every table: the `MAGLEV_V4` entries owned.
    pub fn slots(&self) -> u64 {
        self.tables.values().map(|t| u64::from(t.key.size)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ids: &[u32], size: u32) -> TableKey {
        TableKey {
            backend_ids: ids.to_vec(),
            size,
        }
    }

    #[test]
    fn shared_until_the_last_user_releases() {
        let mut t = MaglevTables::new();
        let id = t.allocate();
        t.register(id, key(&[1, 2], 7), 1);
        assert_eq!(t.find(&key(&[1, 2], 7)), Some(id));
        assert_eq!(t.find(&key(&[1, 2], 11)), None, "size is part of the key");
        assert_eq!(t.find(&key(&[2, 1], 7)), None, "order is part of the key");
        t.retain(id);
        assert_eq!(t.users(id), 2);
        assert_eq!(t.release(id), None, "still used");
        assert_eq!(t.release(id), Some(7), "last user: delete 7 slots");
        assert!(t.is_empty());
        assert_eq!(t.find(&key(&[1, 2], 7)), None);
        assert_eq!(t.allocate(), id, "freed ids are reused");
    }

    #[test]
    fn allocation_skips_adopted_ids() {
        let mut t = MaglevTables::new();
        t.register(1, key(&[1], 7), 1);
        t.register(2, key(&[2], 7), 1);
        assert_eq!(t.allocate(), 3);
        assert_eq!(t.slots(), 14);
    }
}
