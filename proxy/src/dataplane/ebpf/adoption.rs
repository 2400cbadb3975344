//! Adopting what an earlier agent pinned: frontends and backends of both
//! families (`SVC_V4`/`SVC_V6`, `BACKENDS_V4`/`BACKENDS_V6`), with the
//! slots, Maglev tables and source ranges they use.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::MapError;
use proxy_common::{Backend, Backend6, MaglevKey, ServiceKey, ServiceKey6, ServiceValue, SlotKey};
use tracing::info;

use super::{
    BackendEntry, BackendIdentity, EbpfDataplane, EbpfError, Programmed, maglev_tables::TableKey,
};
use crate::{lb::FrontendKey, model::Protocol};

impl EbpfDataplane {
    /// Rebuild in-memory state from pinned maps, dropping what is
    /// inconsistent (slots of a dead generation, orphaned rev-NAT entries).
    pub(super) fn adopt(&mut self) -> Result<(), EbpfError> {
        let m = &mut self.maps;
        let v4: Vec<(u32, Backend)> = collect(m.backends.iter(), "BACKENDS_V4")?;
        let v6: Vec<(u32, Backend6)> = collect(m.backends6.iter(), "BACKENDS_V6")?;
        let backends = v4
            .into_iter()
            .map(|(id, b)| (id, IpAddr::from(b.ip()), b.host_port(), b.proto, b.flags))
            .chain(
                v6.into_iter()
                    .map(|(id, b)| (id, IpAddr::from(b.ip()), b.host_port(), b.proto, b.flags)),
            );
        for (id, addr, port, proto, flags) in backends {
            self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1));
            self.backends.insert(
                BackendIdentity { addr, port, proto },
                BackendEntry { id, flags, refs: 0 },
            );
        }
        let mut ranges: HashMap<u32, Vec<(Ipv4Addr, u8)>> = HashMap::new();
        for k in m.source_ranges.keys().filter_map(Result::ok) {
            let d = k.data();
            ranges
                .entry(d.service_id())
                .or_default()
                .push((d.ip(), k.prefix_len().saturating_sub(32) as u8));
        }
        let v4: Vec<(ServiceKey, ServiceValue)> = collect(m.services.iter(), "SVC_V4")?;
        let v6: Vec<(ServiceKey6, ServiceValue)> = collect(m.services6.iter(), "SVC_V6")?;
        // (address, port, protocol number, value) of both families.
        let services: Vec<(IpAddr, u16, u8, ServiceValue)> = v4
            .into_iter()
            .map(|(k, v)| (IpAddr::from(k.ip()), k.host_port(), k.proto, v))
            .chain(
                v6.into_iter()
                    .map(|(k, v)| (IpAddr::from(k.ip()), k.host_port(), k.proto, v)),
            )
            .collect();
        // Maglev tables: the size each referenced table id must have, and
        // how many of its slots are there. Entries of no referenced table,
        // or beyond its size, are stale.
        let mut table_size: HashMap<u32, u32> = HashMap::new();
        for (.., v) in &services {
            if v.maglev_size != 0 {
                table_size.entry(v.maglev_table).or_insert(v.maglev_size);
            }
        }
        let mut present: HashMap<u32, u32> = HashMap::new();
        let mut stale_maglev = Vec::new();
        for k in m.maglev.keys().filter_map(Result::ok) {
            match table_size.get(&k.table_id) {
                Some(size) if k.slot < *size => *present.entry(k.table_id).or_default() += 1,
                _ => stale_maglev.push(k),
            }
        }
        let complete =
            |t: u32, size: u32| table_size.get(&t) == Some(&size) && present.get(&t) == Some(&size);
        let mut live_slots = BTreeSet::new();
        for (addr, port, proto, v) in services {
            self.next_frontend_id = self.next_frontend_id.max(v.id.wrapping_add(1));
            let Some(proto) = Protocol::from_number(proto) else {
                continue;
            };
            let mut ids = Vec::with_capacity(v.count as usize);
            for index in 0..v.count {
                let slot = SlotKey {
                    service_id: v.id,
                    generation: v.generation as u16,
                    index,
                };
                live_slots.insert(slot);
                if let Ok(id) = m.slots.get(&slot, 0) {
                    ids.push(id);
                }
            }
            let key = FrontendKey { addr, port, proto };
            self.frontends.insert(
                key,
                Programmed {
                    id: v.id,
                    generation: v.generation,
                    flags: v.flags,
                    affinity_timeout: v.affinity_timeout,
                    source_ranges: ranges.remove(&v.id).unwrap_or_default().into(),
                    backend_ids: ids.into(),
                    maglev_table: (v.maglev_size != 0 && complete(v.maglev_table, v.maglev_size))
                        .then_some(v.maglev_table),
                    // Not pinned: a size other than the agent's must have
                    // come from an annotation (an IPv6 frontend has none in
                    // the maps; its size is never compared, see `upsert`).
                    maglev_override: (v.maglev_size != 0
                        && v.maglev_size != self.cfg.maglev_table_size)
                        .then_some(v.maglev_size),
                },
            );
        }
        for p in self.frontends.values() {
            let Some(t) = p.maglev_table else { continue };
            if self.maglev_tables.key(t).is_some() {
                self.maglev_tables.retain(t);
            } else {
                let size = table_size.get(&t).copied().unwrap_or(0);
                let key = TableKey {
                    backend_ids: p.backend_ids.to_vec(),
                    size,
                };
                self.maglev_tables.register(t, key, 1);
            }
        }
        // Incomplete tables have no owner either (their frontends select
        // at random until they are programmed again).
        let owned: BTreeSet<u32> = self
            .frontends
            .values()
            .filter_map(|p| p.maglev_table)
            .collect();
        let incomplete: Vec<MaglevKey> = if owned.len() == table_size.len() {
            Vec::new()
        } else {
            m.maglev
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !owned.contains(&k.table_id))
                .collect()
        };
        let m = &mut self.maps;
        let stale_tables = stale_maglev.len() + incomplete.len();
        for k in stale_maglev.into_iter().chain(incomplete) {
            let _ = m.maglev.remove(&k);
        }
        if stale_tables > 0 {
            info!(
                entries = stale_tables,
                "deleted Maglev entries no frontend owns"
            );
        }
        let stale: Vec<SlotKey> = collect(m.slots.keys().map(|r| r.map(|k| (k, ()))), "SLOTS")?
            .into_iter()
            .map(|(k, ())| k)
            .filter(|k| !live_slots.contains(k))
            .collect();
        for k in stale {
            let _ = m.slots.remove(&k);
        }
        let ids: BTreeSet<u32> = self.frontends.values().map(|p| p.id).collect();
        let orphans: Vec<u32> = collect(m.revnat.keys().map(|r| r.map(|k| (k, ()))), "REVNAT")?
            .into_iter()
            .map(|(k, ())| k)
            .filter(|k| !ids.contains(k))
            .collect();
        for k in orphans {
            let _ = m.revnat.remove(&k);
        }
        let orphans: Vec<u32> = collect(m.revnat6.keys().map(|r| r.map(|k| (k, ()))), "REVNAT_V6")?
            .into_iter()
            .map(|(k, ())| k)
            .filter(|k| !ids.contains(k))
            .collect();
        for k in orphans {
            let _ = m.revnat6.remove(&k);
        }
        if !self.frontends.is_empty() {
            info!(
                frontends = self.frontends.len(),
                backends = self.backends.len(),
                "adopted pinned state"
            );
        }
        Ok(())
    }
}

impl EbpfDataplane {
    /// Backend reference counts from the adopted table (after
    /// [`Self::adopt`] and `table_from_maps`); backends no frontend uses
    /// go at the next apply.
    pub(super) fn count_backend_refs(&mut self) {
        for (k, f) in &self.table.frontends {
            let proto = k.proto.number();
            for b in &f.backends {
                let i = BackendIdentity {
                    addr: b.addr,
                    port: b.port,
                    proto,
                };
                if let Some(refs) = self.backends.refs_mut(&i) {
                    *refs += 1;
                }
            }
        }
        self.unreferenced = self
            .backends
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(k, _)| k)
            .collect();
    }
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    map: &'static str,
) -> Result<Vec<(K, V)>, EbpfError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|source| EbpfError::Update {
            map,
            op: "iterate",
            frontend: "(adopting pinned state)".to_owned(),
            source: Box::new(source),
        })
}
