//! Programming frontends: backends, slots, service entries.
//!
//! IPv6 frontends go to `SVC_V6`, their backends to `BACKENDS_V6` and
//! their reverse-NAT entry to `REVNAT_V6` (socket LB, and the per-packet
//! path on pods' interfaces); slots, affinity membership and counters are
//! shared with IPv4 (ids are one space). What only the north-south
//! per-packet path reads is not written for them (it is IPv4 only): no
//! Maglev table, no `SRC_RANGES_V4` entries. An IPv6 frontend with source
//! ranges is written with the `SOURCE_RANGES` flag: socket LB leaves such
//! a frontend to the per-packet path, which has no IPv6 source ranges and
//! drops its packets, so it is not served (closed, never open to every
//! client).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key as LpmKey};
use proxy_common::{
    AffinityMatchKey, Backend, Backend6, MaglevKey, RevNat, RevNat6, ServiceKey, ServiceKey6,
    ServiceValue, SlotKey, SourceRangeKey, SvcStats, backend_flags, ip6_words, maps as defs,
    svc_flags,
};
use tracing::warn;

use super::{
    BackendEntry, BackendIdentity, EbpfDataplane, EbpfError, Programmed,
    load::nr_cpus_or_one,
    maglev_tables::TableKey,
    maps::{self, SvcFlags, flags_kind, kind_flags},
};
use crate::{
    dataplane::ApplyStats,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind},
    maglev::MaglevBackend,
};

fn identity(b: &BackendAddr, proto: u8) -> BackendIdentity {
    BackendIdentity {
        addr: b.addr,
        port: b.port,
        proto,
    }
}

impl EbpfDataplane {
    /// The backend ids of `fe`'s backends, in order. Backends the maps do
    /// not hold yet (or hold with other flags) are written first, one batch
    /// per family; they stay unreferenced until the frontend using them is
    /// programmed (if that fails: see `forget_unused`).
    pub(super) fn backend_ids(
        &mut self,
        fe: &Frontend,
        proto: u8,
        stats: &mut ApplyStats,
    ) -> Result<Vec<u32>, EbpfError> {
        let mut ids = Vec::with_capacity(fe.backends.len());
        // (identity, entry, newly added) of the writes, per family.
        let mut pending4: Vec<(BackendIdentity, BackendEntry, bool)> = Vec::new();
        let mut pending6: Vec<(BackendIdentity, BackendEntry, bool)> = Vec::new();
        // A backend listed twice is written once.
        let mut pending_ids: HashMap<BackendIdentity, u32> = HashMap::new();
        for b in fe.backends.iter() {
            let identity = identity(&b, proto);
            let mut flags = 0;
            if b.terminating {
                flags |= backend_flags::TERMINATING;
            }
            if b.local {
                flags |= backend_flags::LOCAL;
            }
            if let Some(id) = pending_ids.get(&identity) {
                ids.push(*id);
                continue;
            }
            let (id, refs) = match self.backends.get(&identity) {
                Some(e) if e.flags == flags => {
                    ids.push(e.id);
                    continue;
                }
                Some(e) => (e.id, Some(e.refs)),
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
                    (id, None)
                }
            };
            let entry = BackendEntry {
                id,
                flags,
                refs: refs.unwrap_or(0),
            };
            let pending = if identity.addr.is_ipv4() {
                &mut pending4
            } else {
                &mut pending6
            };
            pending.push((identity, entry, refs.is_none()));
            pending_ids.insert(identity, id);
            ids.push(id);
        }
        let keys = |p: &[(BackendIdentity, BackendEntry, bool)]| -> Vec<u32> {
            p.iter().map(|(_, e, _)| e.id).collect()
        };
        let v4: Vec<Backend> = pending4
            .iter()
            .filter_map(|(b, e, _)| match b.addr {
                IpAddr::V4(a) => Some(Backend::new(a, b.port, b.proto, e.flags)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<Backend6> = pending6
            .iter()
            .filter_map(|(b, e, _)| match b.addr {
                IpAddr::V6(a) => Some(Backend6::new(a, b.port, b.proto, e.flags)),
                IpAddr::V4(_) => None,
            })
            .collect();
        let mut failed = None;
        let done4 = match maps::insert_batch(&mut self.maps.backends, &keys(&pending4), &v4) {
            Ok(()) => pending4.len(),
            Err((n, e)) => {
                // The failing entry (a batch that failed is not empty).
                let n = n.min(pending4.len() - 1);
                failed = Some((defs::BACKENDS.name, pending4[n].0, e));
                n
            }
        };
        let done6 = if failed.is_some() {
            0
        } else {
            match maps::insert_batch(&mut self.maps.backends6, &keys(&pending6), &v6) {
                Ok(()) => pending6.len(),
                Err((n, e)) => {
                    let n = n.min(pending6.len() - 1);
                    failed = Some((defs::BACKENDS6.name, pending6[n].0, e));
                    n
                }
            }
        };
        // What the maps now hold is in the table (an unreferenced backend
        // of a failed upsert is deleted by `forget_unused`).
        for (b, e, added) in pending4[..done4].iter().chain(&pending6[..done6]) {
            self.backends.insert(*b, *e);
            if *added {
                stats.backends_added += 1;
            }
        }
        match failed {
            None => Ok(ids),
            Some((map, b, source)) => Err(self.map_error(
                map,
                "insert",
                format!("(backend {})", std::net::SocketAddr::new(b.addr, b.port)),
                source,
            )),
        }
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
        let ids = match self.backend_ids(fe, proto, stats) {
            Ok(ids) => ids,
            Err(e) => {
                self.forget_unused(fe, proto);
                return Err(e);
            }
        };
        let flags = service_flags(fe);
        let want_table = self.maglev_key(key, fe, &ids);
        // An IPv6 frontend's ranges and Maglev size are in no map (see the
        // module documentation): they cannot differ from what is there.
        let v4 = key.addr.is_ipv4();
        let (id, generation, old) = match self.frontends.get(key) {
            Some(p)
                if *p.backend_ids == *ids
                    && p.flags == flags
                    && p.affinity_timeout == fe.affinity_timeout
                    && *p.source_ranges == *lpm_ranges(fe)
                    && p.maglev_table.and_then(|t| self.maglev_tables.key(t))
                        == want_table.as_ref()
                    && (!v4 || p.maglev_override == fe.maglev_table_size) =>
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
        let target = Target {
            id,
            generation,
            flags,
        };
        if let Err(e) = self.write_frontend(key, fe, &ids, target, old.as_ref(), want_table) {
            // Nothing of the new state stays: the maps hold the old
            // frontend (or none), and entries a full map refused do not
            // leave orphans behind in the other maps.
            self.undo_partial(fe, &ids, target, old.as_ref());
            self.forget_unused(fe, proto);
            return Err(e);
        }
        stats.upserted += 1;
        Ok(())
    }

    /// The writes of [`Self::upsert`] past the backends, in the order a
    /// packet needs them: slots, affinity membership, counters and rev-NAT
    /// (new frontend), source ranges, Maglev table, service entry; then the
    /// old generation's leftovers go.
    fn write_frontend(
        &mut self,
        key: &FrontendKey,
        fe: &Frontend,
        ids: &[u32],
        target: Target,
        old: Option<&Programmed>,
        want_table: Option<TableKey>,
    ) -> Result<(), EbpfError> {
        let Target {
            id,
            generation,
            flags,
        } = target;
        let proto = key.proto.number();
        let update = |dp: &Self, op: &'static str, map: &'static str, source| {
            dp.map_error(map, op, key.to_string(), source)
        };
        // One batch per map (a syscall per frontend, not per backend).
        let slots: Vec<SlotKey> = (0..ids.len())
            .map(|index| SlotKey {
                service_id: id,
                generation: generation as u16,
                index: index as u16,
            })
            .collect();
        if let Err((_, e)) = maps::insert_batch(&mut self.maps.slots, &slots, ids) {
            return Err(update(self, "insert", defs::SLOTS.name, e));
        }
        // Affinity membership of backends joining the frontend, before the
        // service entry that makes them reachable.
        let joining: Vec<AffinityMatchKey> = ids
            .iter()
            .filter(|b| old.is_none_or(|o| !o.backend_ids.contains(b)))
            .map(|b| AffinityMatchKey {
                service_id: id,
                backend_id: *b,
            })
            .collect();
        let ones = vec![1u8; joining.len()];
        if let Err((_, e)) = maps::insert_batch(&mut self.maps.affinity_match, &joining, &ones) {
            return Err(update(self, "insert", defs::AFFINITY_MATCH.name, e));
        }
        if old.is_none() {
            let zero = PerCpuValues::try_from(vec![SvcStats::default(); nr_cpus_or_one()])
                .map_err(EbpfError::Cpus)?;
            if let Err(e) = self.maps.svc_stats.insert(id, zero, 0) {
                return Err(update(self, "insert", defs::SVC_STATS.name, e));
            }
            // Reverse NAT is the per-packet path's.
            let written = match key.addr {
                IpAddr::V4(a) => {
                    let rev = RevNat {
                        addr: u32::from_ne_bytes(a.octets()),
                        port: key.port.to_be(),
                        _pad: 0,
                    };
                    self.maps
                        .revnat
                        .insert(id, rev, 0)
                        .map_err(|e| (defs::REVNAT.name, e))
                }
                IpAddr::V6(a) => {
                    let rev = RevNat6 {
                        addr: ip6_words(a),
                        port: key.port.to_be(),
                        _pad: 0,
                    };
                    self.maps
                        .revnat6
                        .insert(id, rev, 0)
                        .map_err(|e| (defs::REVNAT6.name, e))
                }
            };
            if let Err((map, e)) = written {
                return Err(update(self, "insert", map, e));
            }
        }
        // Allowed ranges before the service entry that enables the check.
        let ranges = lpm_ranges(fe);
        for (addr, len) in &ranges {
            if let Err(e) = self
                .maps
                .source_ranges
                .insert(&range_key(id, *addr, *len), 1, 0)
            {
                return Err(update(self, "insert", defs::SOURCE_RANGES.name, e));
            }
        }
        // The Maglev table, written (or shared) right before the service
        // entry that points at it: nothing can fail in between and leave
        // it without its user.
        let old_table = old.and_then(|o| o.maglev_table);
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
        let written = self
            .write_service(key, value)
            .map_err(|(map, e)| update(self, "insert", map, e));
        if let Err(e) = written {
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
        // The frontend's backends now: references move from the old list
        // to the new one (new first, so shared ones never reach 0).
        for b in &fe.backends {
            if let Some(refs) = self.backends.refs_mut(&identity(&b, proto)) {
                *refs += 1;
            }
        }
        if let Some(prev) = self.table.frontends.get(key) {
            for b in &prev.backends {
                let i = identity(&b, proto);
                if let Some(refs) = self.backends.refs_mut(&i) {
                    *refs = refs.saturating_sub(1);
                    if *refs == 0 {
                        self.unreferenced.insert(i);
                    }
                }
            }
        }
        if let Some(old) = old {
            self.delete_slots(old.id, old.generation, old.backend_ids.len());
            for backend_id in old.backend_ids.iter().filter(|b| !ids.contains(b)) {
                self.delete_affinity_match(id, *backend_id);
            }
            for (addr, len) in old.source_ranges.iter().filter(|r| !ranges.contains(r)) {
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
                source_ranges: ranges.into(),
                backend_ids: ids.into(),
                maglev_table: table.map(|(t, _)| t),
                maglev_override: fe.maglev_table_size,
            },
        );
        Ok(())
    }

    /// After a failed upsert: backends written for it that no frontend
    /// uses go at the end of the apply.
    fn forget_unused(&mut self, fe: &Frontend, proto: u8) {
        for b in &fe.backends {
            let i = identity(&b, proto);
            if self.backends.get(&i).is_some_and(|e| e.refs == 0) {
                self.unreferenced.insert(i);
            }
        }
    }

    /// After a failed [`Self::write_frontend`]: delete what it wrote
    /// before the failure (deleting what is not there is harmless). The
    /// live generation and the old frontend's entries stay.
    fn undo_partial(&mut self, fe: &Frontend, ids: &[u32], t: Target, old: Option<&Programmed>) {
        self.delete_slots(t.id, t.generation, ids.len());
        for backend_id in ids {
            if old.is_none_or(|o| !o.backend_ids.contains(backend_id)) {
                self.delete_affinity_match(t.id, *backend_id);
            }
        }
        if old.is_none() {
            let _ = self.maps.svc_stats.remove(&t.id);
            let _ = self.maps.revnat.remove(&t.id);
            let _ = self.maps.revnat6.remove(&t.id);
        }
        for (addr, len) in lpm_ranges(fe) {
            if old.is_none_or(|o| !o.source_ranges.contains(&(addr, len))) {
                let _ = self.maps.source_ranges.remove(&range_key(t.id, addr, len));
            }
        }
    }

    /// What Maglev table a north-south frontend needs (None: ClusterIP,
    /// IPv6 (Maglev is the per-packet path's), Maglev off, or no
    /// backends).
    pub(super) fn maglev_key(
        &self,
        key: &FrontendKey,
        fe: &Frontend,
        ids: &[u32],
    ) -> Option<TableKey> {
        let size = fe.maglev_table_size.unwrap_or(self.cfg.maglev_table_size);
        (size != 0 && key.addr.is_ipv4() && fe.kind != FrontendKind::ClusterIp && !ids.is_empty())
            .then(|| TableKey {
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
                return Err(self.map_error(defs::MAGLEV.name, "insert", key.to_string(), source));
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
        let Some(p) = self.frontends.get(key).cloned() else {
            return Ok(());
        };
        let proto = key.proto.number();
        match self.delete_service(key) {
            Ok(()) | Err((_, MapError::KeyNotFound)) => {}
            Err((map, source)) => {
                // Still programmed: kept, so a later sync retries.
                return Err(EbpfError::Update {
                    map,
                    op: "delete",
                    frontend: key.to_string(),
                    source: Box::new(source),
                });
            }
        }
        self.frontends.remove(key);
        if let Some(prev) = self.table.frontends.remove(key) {
            for b in &prev.backends {
                let i = identity(&b, proto);
                if let Some(refs) = self.backends.refs_mut(&i) {
                    *refs = refs.saturating_sub(1);
                    if *refs == 0 {
                        self.unreferenced.insert(i);
                    }
                }
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
        let _ = self.maps.revnat6.remove(&p.id);
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

    /// Delete backends no frontend references any more: only those whose
    /// count reached 0 since the last call are looked at.
    pub(super) fn release_backends(&mut self, stats: &mut ApplyStats) {
        for k in std::mem::take(&mut self.unreferenced) {
            if self.backends.get(&k).is_some_and(|e| e.refs == 0)
                && let Some(e) = self.backends.remove(&k)
            {
                let _ = self.delete_backend(e.id, k.addr);
                self.removed_backends.insert(e.id);
                stats.backends_removed += 1;
            }
        }
    }
}

/// The one place each family's map is chosen: a frontend's service entry
/// (`SVC_V4` / `SVC_V6`) and a backend (`BACKENDS_V4` / `BACKENDS_V6`).
/// Errors carry the map's name.
impl EbpfDataplane {
    fn write_service(
        &mut self,
        key: &FrontendKey,
        value: ServiceValue,
    ) -> Result<(), (&'static str, MapError)> {
        let proto = key.proto.number();
        match key.addr {
            IpAddr::V4(a) => self
                .maps
                .services
                .insert(ServiceKey::new(a, key.port, proto), value, 0)
                .map_err(|e| (defs::SERVICES.name, e)),
            IpAddr::V6(a) => self
                .maps
                .services6
                .insert(ServiceKey6::new(a, key.port, proto), value, 0)
                .map_err(|e| (defs::SERVICES6.name, e)),
        }
    }

    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), (&'static str, MapError)> {
        let proto = key.proto.number();
        match key.addr {
            IpAddr::V4(a) => self
                .maps
                .services
                .remove(&ServiceKey::new(a, key.port, proto))
                .map_err(|e| (defs::SERVICES.name, e)),
            IpAddr::V6(a) => self
                .maps
                .services6
                .remove(&ServiceKey6::new(a, key.port, proto))
                .map_err(|e| (defs::SERVICES6.name, e)),
        }
    }

    fn delete_backend(&mut self, id: u32, family: IpAddr) -> Result<(), MapError> {
        match family {
            IpAddr::V4(_) => self.maps.backends.remove(&id),
            IpAddr::V6(_) => self.maps.backends6.remove(&id),
        }
    }
}

/// Where [`EbpfDataplane::upsert`] writes a frontend.
#[derive(Clone, Copy)]
struct Target {
    id: u32,
    generation: u8,
    flags: u16,
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

/// The ranges of `fe` that go to `SRC_RANGES_V4` (an IPv4 frontend's; an
/// IPv6 frontend's ranges are IPv6 and go nowhere: see the module
/// documentation).
pub(super) fn lpm_ranges(fe: &Frontend) -> Vec<(Ipv4Addr, u8)> {
    fe.source_ranges
        .iter()
        .filter_map(|(a, len)| match a {
            IpAddr::V4(a) => Some((*a, *len)),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// The `SVC_V4` / `SVC_V6` flag bits of a frontend: its kind and its per-service
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
        backends: backends.into(),
        affinity_timeout: p.affinity_timeout,
        source_ranges: p
            .source_ranges
            .iter()
            .map(|(a, len)| (IpAddr::V4(*a), *len))
            .collect(),
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
