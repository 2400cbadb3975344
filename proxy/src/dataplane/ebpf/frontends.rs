//! Programming frontends: backends, slots, service entries.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key as LpmKey};
use proxy_common::{
    AffinityMatchKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SlotKey,
    SourceRangeKey, SvcStats, backend_flags, svc_flags,
};
use tracing::warn;

use super::{
    BackendIdentity, EbpfDataplane, EbpfError, Programmed,
    load::nr_cpus_or_one,
    maglev_tables::TableKey,
    maps::{SvcFlags, flags_kind, kind_flags},
};
use crate::{
    dataplane::ApplyStats,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind},
    maglev::MaglevBackend,
};

impl EbpfDataplane {
    pub(super) fn backend_id(
        &mut self,
        b: &BackendAddr,
        proto: u8,
        stats: &mut ApplyStats,
    ) -> Result<u32, EbpfError> {
        let identity = BackendIdentity {
            addr: b.addr,
            port: b.port,
            proto,
        };
        let mut flags = 0;
        if b.terminating {
            flags |= backend_flags::TERMINATING;
        }
        if b.local {
            flags |= backend_flags::LOCAL;
        }
        let value = Backend::new(b.addr, b.port, proto, flags);
        let (id, is_new) = match self.backends.get(&identity) {
            Some((id, old)) if *old == value => return Ok(*id),
            Some((id, _)) => (*id, false),
            None => {
                let id = self.next_backend_id;
                self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
                (id, true)
            }
        };
        self.maps
            .backends
            .insert(id, value, 0)
            .map_err(|source| EbpfError::Update {
                map: "BACKENDS",
                op: "insert",
                frontend: format!("{}:{}", b.addr, b.port),
                source: Box::new(source),
            })?;
        self.backends.insert(identity, (id, value));
        if is_new {
            stats.backends_added += 1;
        }
        Ok(id)
    }

    pub(super) fn upsert(
        &mut self,
        key: &FrontendKey,
        fe: &Frontend,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let proto = key.proto.number();
        if fe.backends.len() > proxy_common::MAX_BACKENDS_PER_SERVICE as usize {
            return Err(EbpfError::TooManyBackends(*key, fe.backends.len()));
        }
        let ids = fe
            .backends
            .iter()
            .map(|b| self.backend_id(b, proto, stats))
            .collect::<Result<Vec<u32>, _>>()?;
        let flags = service_flags(fe);
        let update = |op: &'static str, map: &'static str| {
            let frontend = key.to_string();
            move |source| EbpfError::Update {
                map,
                op,
                frontend,
                source: Box::new(source),
            }
        };

        let want_table = self.maglev_key(fe, &ids);
        let (id, generation, old) = match self.frontends.get(key) {
            Some(p)
                if p.backend_ids == ids
                    && p.flags == flags
                    && p.affinity_timeout == fe.affinity_timeout
                    && p.source_ranges == fe.source_ranges
                    && p.maglev_table.and_then(|t| self.maglev_tables.key(t))
                        == want_table.as_ref()
                    && p.maglev_override == fe.maglev_table_size =>
            {
                // Nothing in the maps changes; what the agent asked for may
                // (a field the maps do not hold).
                self.table.frontends.insert(*key, fe.clone());
                return Ok(());
            }
            Some(p) => (p.id, 1 - p.generation, Some(p.clone())),
            None => {
                let id = self.next_frontend_id;
                self.next_frontend_id = self.next_frontend_id.wrapping_add(1).max(1);
                (id, 0, None)
            }
        };
        for (index, backend_id) in ids.iter().enumerate() {
            let slot = SlotKey {
                service_id: id,
                generation: generation as u16,
                index: index as u16,
            };
            self.maps
                .slots
                .insert(slot, *backend_id, 0)
                .map_err(update("insert", "SLOTS"))?;
        }
        // Affinity membership of backends joining the frontend, before the
        // service entry that makes them reachable.
        for backend_id in &ids {
            if old
                .as_ref()
                .is_none_or(|o| !o.backend_ids.contains(backend_id))
            {
                self.maps
                    .affinity_match
                    .insert(
                        AffinityMatchKey {
                            service_id: id,
                            backend_id: *backend_id,
                        },
                        1,
                        0,
                    )
                    .map_err(update("insert", "AFF_MATCH_V4"))?;
            }
        }
        if old.is_none() {
            let zero = PerCpuValues::try_from(vec![SvcStats::default(); nr_cpus_or_one()])
                .map_err(EbpfError::Cpus)?;
            self.maps
                .svc_stats
                .insert(id, zero, 0)
                .map_err(update("insert", "SVC_STATS"))?;
            let rev = RevNat {
                addr: u32::from_ne_bytes(key.addr.octets()),
                port: key.port.to_be(),
                _pad: 0,
            };
            self.maps
                .revnat
                .insert(id, rev, 0)
                .map_err(update("insert", "REVNAT"))?;
        }
        // Allowed ranges before the service entry that enables the check.
        for (addr, len) in &fe.source_ranges {
            self.maps
                .source_ranges
                .insert(&range_key(id, *addr, *len), 1, 0)
                .map_err(update("insert", "SRC_RANGES_V4"))?;
        }
        // The Maglev table, written (or shared) right before the service
        // entry that points at it: nothing can fail in between and leave
        // it without its user.
        let old_table = old.as_ref().and_then(|o| o.maglev_table);
        let table = match want_table {
            Some(k) if old_table.and_then(|t| self.maglev_tables.key(t)) == Some(&k) => {
                old_table.map(|t| (t, k.size))
            }
            Some(k) => self.acquire_maglev_table(key, fe, k)?,
            None => None,
        };
        let value = ServiceValue {
            id,
            count: ids.len() as u16,
            generation,
            _pad0: 0,
            flags,
            _pad1: 0,
            affinity_timeout: fe.affinity_timeout,
            maglev_size: table.map(|(_, m)| m).unwrap_or(0),
            maglev_table: table.map(|(t, _)| t).unwrap_or(0),
        };
        if let Err(e) = self
            .maps
            .services
            .insert(ServiceKey::new(key.addr, key.port, proto), value, 0)
            .map_err(update("insert", "SVC_V4"))
        {
            // The new table has no user after all.
            if let Some((t, _)) = table
                && table.map(|x| x.0) != old_table
            {
                self.release_maglev_table(t);
            }
            return Err(e);
        }
        // The old table after the service entry stopped pointing at it.
        if let Some(t) = old_table
            && table.map(|x| x.0) != Some(t)
        {
            self.release_maglev_table(t);
        }
        if let Some(old) = old {
            self.delete_slots(old.id, old.generation, old.backend_ids.len());
            for backend_id in old.backend_ids.iter().filter(|b| !ids.contains(b)) {
                self.delete_affinity_match(id, *backend_id);
            }
            for (addr, len) in old
                .source_ranges
                .iter()
                .filter(|r| !fe.source_ranges.contains(r))
            {
                let _ = self.maps.source_ranges.remove(&range_key(id, *addr, *len));
            }
        }
        self.table.frontends.insert(*key, fe.clone());
        self.frontends.insert(
            *key,
            Programmed {
                id,
                generation,
                flags,
                affinity_timeout: fe.affinity_timeout,
                source_ranges: fe.source_ranges.clone(),
                backend_ids: ids,
                maglev_table: table.map(|(t, _)| t),
                maglev_override: fe.maglev_table_size,
            },
        );
        stats.upserted += 1;
        Ok(())
    }

    /// What Maglev table a north-south frontend needs (None: ClusterIP,
    /// Maglev off, or no backends).
    pub(super) fn maglev_key(&self, fe: &Frontend, ids: &[u32]) -> Option<TableKey> {
        let size = fe.maglev_table_size.unwrap_or(self.cfg.maglev_table_size);
        (size != 0 && fe.kind != FrontendKind::ClusterIp && !ids.is_empty()).then(|| TableKey {
            backend_ids: ids.to_vec(),
            size,
        })
    }

    /// The id and size of a table with `k`'s content: an existing one
    /// (shared), or a new one whose `M` slots are written now. None when
    /// the table cannot be built (logged: random selection).
    fn acquire_maglev_table(
        &mut self,
        key: &FrontendKey,
        fe: &Frontend,
        k: TableKey,
    ) -> Result<Option<(u32, u32)>, EbpfError> {
        if let Some(t) = self.maglev_tables.find(&k) {
            self.maglev_tables.retain(t);
            return Ok(Some((t, k.size)));
        }
        let slots = match build_maglev(fe, &k) {
            Ok(s) => s,
            Err(e) => {
                warn!(frontend = %key, error = %e, "no Maglev table; random selection");
                return Ok(None);
            }
        };
        if slots.len() != k.size as usize {
            warn!(frontend = %key, slots = slots.len(), size = k.size, "incomplete Maglev table; random selection");
            return Ok(None);
        }
        let t = self.maglev_tables.allocate();
        for (slot, backend_id) in slots.iter().enumerate() {
            let r = self.maps.maglev.insert(
                MaglevKey {
                    table_id: t,
                    slot: slot as u32,
                },
                *backend_id,
                0,
            );
            if let Err(source) = r {
                self.delete_maglev_slots(t, slot as u32);
                self.maglev_tables.unallocate(t);
                return Err(EbpfError::Update {
                    map: proxy_common::maps::MAGLEV.name,
                    op: "insert",
                    frontend: key.to_string(),
                    source: Box::new(source),
                });
            }
        }
        let size = k.size;
        self.maglev_tables.register(t, k, 1);
        Ok(Some((t, size)))
    }

    /// A frontend stopped using table `t`: the last user deletes its slots.
    pub(super) fn release_maglev_table(&mut self, t: u32) {
        if let Some(size) = self.maglev_tables.release(t) {
            self.delete_maglev_slots(t, size);
        }
    }

    fn delete_maglev_slots(&mut self, table_id: u32, count: u32) {
        for slot in 0..count {
            let _ = self.maps.maglev.remove(&MaglevKey { table_id, slot });
        }
    }

    pub(super) fn remove(
        &mut self,
        key: &FrontendKey,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let Some(p) = self.frontends.remove(key) else {
            return Ok(());
        };
        self.table.frontends.remove(key);
        let skey = ServiceKey::new(key.addr, key.port, key.proto.number());
        match self.maps.services.remove(&skey) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(EbpfError::Update {
                    map: "SERVICES",
                    op: "delete",
                    frontend: key.to_string(),
                    source: Box::new(source),
                });
            }
        }
        self.delete_slots(p.id, p.generation, p.backend_ids.len());
        for backend_id in &p.backend_ids {
            self.delete_affinity_match(p.id, *backend_id);
        }
        if let Some(t) = p.maglev_table {
            self.release_maglev_table(t);
        }
        self.removed_frontends.insert(p.id);
        let _ = self.maps.revnat.remove(&p.id);
        let _ = self.maps.svc_stats.remove(&p.id);
        for (addr, len) in &p.source_ranges {
            let _ = self
                .maps
                .source_ranges
                .remove(&range_key(p.id, *addr, *len));
        }
        stats.removed += 1;
        Ok(())
    }

    pub(super) fn delete_affinity_match(&mut self, service_id: u32, backend_id: u32) {
        let _ = self.maps.affinity_match.remove(&AffinityMatchKey {
            service_id,
            backend_id,
        });
    }

    pub(super) fn delete_slots(&mut self, id: u32, generation: u8, count: usize) {
        for index in 0..count {
            let _ = self.maps.slots.remove(&SlotKey {
                service_id: id,
                generation: generation as u16,
                index: index as u16,
            });
        }
    }

    /// Delete backends no frontend references any more.
    pub(super) fn release_backends(&mut self, stats: &mut ApplyStats) {
        let used: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|p| p.backend_ids.iter().copied())
            .collect();
        let unused: Vec<BackendIdentity> = self
            .backends
            .iter()
            .filter(|(_, (id, _))| !used.contains(id))
            .map(|(k, _)| *k)
            .collect();
        for k in unused {
            if let Some((id, _)) = self.backends.remove(&k) {
                let _ = self.maps.backends.remove(&id);
                self.removed_backends.insert(id);
                stats.backends_removed += 1;
            }
        }
    }
}

pub(super) fn range_key(id: u32, addr: Ipv4Addr, len: u8) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        32 + u32::from(len),
        SourceRangeKey {
            service_id_be: id.to_be(),
            addr: u32::from_ne_bytes(addr.octets()),
        },
    )
}

/// The `SVC_V4` flag bits of a frontend: its kind and its per-service
/// options. [`frontend_of`] is the inverse.
pub(super) fn service_flags(fe: &Frontend) -> u16 {
    let mut flags = kind_flags(fe.kind);
    if !fe.source_ranges.is_empty() {
        flags |= svc_flags::SOURCE_RANGES;
    }
    if fe.local_only {
        flags |= svc_flags::LOCAL_ONLY;
    }
    flags
}

/// The frontend a programmed entry stands for (what [`super::Dataplane::programmed`]
/// reports, so the agent diffs against what is really there).
pub(super) fn frontend_of(p: &Programmed, backends: Vec<BackendAddr>) -> Frontend {
    let flags = SvcFlags(p.flags);
    Frontend {
        kind: flags_kind(p.flags),
        backends,
        affinity_timeout: p.affinity_timeout,
        source_ranges: p.source_ranges.clone(),
        maglev_table_size: p.maglev_override,
        local_only: flags.local_only(),
    }
}

/// Backend id per slot of the Maglev table of `fe`'s backends (whose ids
/// are `k.backend_ids`, in the same order).
fn build_maglev(fe: &Frontend, k: &TableKey) -> Result<Vec<u32>, crate::maglev::MaglevError> {
    let mut by_key = HashMap::new();
    let backends: Vec<MaglevBackend> = fe
        .backends
        .iter()
        .zip(&k.backend_ids)
        .map(|(b, id)| {
            let m = MaglevBackend::from_addr((b.addr, b.port), 1);
            by_key.insert(m.key.clone(), *id);
            m
        })
        .collect();
    let t = crate::maglev::build(&backends, k.size)?;
    Ok(t.slots
        .iter()
        .filter_map(|i| {
            t.backends
                .get(*i as usize)
                .and_then(|key| by_key.get(key))
                .copied()
        })
        .collect())
}
