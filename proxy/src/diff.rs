//! Desired vs programmed frontends -> the changes a dataplane applies. Pure.

use crate::lb::{Frontend, FrontendKey, LbTable};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create the frontend or replace its backend set.
    Upsert(FrontendKey, Frontend),
    Remove(FrontendKey),
}

/// The change that makes frontend `key` of `programmed` what `desired`
/// says (None: no frontend), if any. The agent's incremental sync calls
/// this for the frontends a sync touched only.
pub fn diff_one(
    programmed: &LbTable,
    key: FrontendKey,
    desired: Option<&Frontend>,
) -> Option<Change> {
    match (desired, programmed.frontends.get(&key)) {
        (Some(d), p) if p != Some(d) => Some(Change::Upsert(key, d.clone())),
        (None, Some(_)) => Some(Change::Remove(key)),
        _ => None,
    }
}

/// The changes that turn `programmed` into `desired`: upserts for new or
/// changed frontends (in key order), then removals.
pub fn diff(programmed: &LbTable, desired: &LbTable) -> Vec<Change> {
    let mut changes: Vec<Change> = desired
        .frontends
        .iter()
        .filter(|(k, f)| programmed.frontends.get(k) != Some(f))
        .map(|(k, f)| Change::Upsert(*k, f.clone()))
        .collect();
    changes.extend(
        programmed
            .frontends
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .map(|k| Change::Remove(*k)),
    );
    changes
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        lb::{BackendAddr, FrontendKind},
        model::Protocol,
    };

    fn key(last: u8) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, last).into(),
            port: 80,
            proto: Protocol::Tcp,
        }
    }

    fn fe(backends: &[u8]) -> Frontend {
        Frontend {
            kind: FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    addr: Ipv4Addr::new(10, 244, 1, *b).into(),
                    port: 8080,
                    terminating: false,
                    local: true,
                })
                .collect(),
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        }
    }

    fn table(entries: &[(u8, &[u8])]) -> LbTable {
        let mut t = LbTable::default();
        for (k, b) in entries {
            t.frontends.insert(key(*k), fe(b));
        }
        t
    }

    #[test]
    fn identical_tables_need_no_change() {
        let t = table(&[(1, &[2, 3]), (2, &[4])]);
        assert!(diff(&t, &t).is_empty());
    }

    #[test]
    fn added_changed_and_removed_frontends() {
        let old = table(&[(1, &[2, 3]), (2, &[4]), (3, &[5])]);
        let new = table(&[(1, &[2]), (2, &[4]), (4, &[6])]);
        assert_eq!(
            diff(&old, &new),
            vec![
                Change::Upsert(key(1), fe(&[2])),
                Change::Upsert(key(4), fe(&[6])),
                Change::Remove(key(3)),
            ]
        );
    }

    #[test]
    fn one_frontend_at_a_time() {
        let old = table(&[(1, &[2, 3]), (2, &[4])]);
        assert_eq!(
            diff_one(&old, key(1), Some(&fe(&[2]))),
            Some(Change::Upsert(key(1), fe(&[2])))
        );
        assert_eq!(diff_one(&old, key(2), Some(&fe(&[4]))), None);
        assert_eq!(diff_one(&old, key(2), None), Some(Change::Remove(key(2))));
        assert_eq!(diff_one(&old, key(3), None), None);
        assert_eq!(
            diff_one(&old, key(3), Some(&fe(&[5]))),
            Some(Change::Upsert(key(3), fe(&[5])))
        );
    }

    #[test]
    fn owners_do_not_cause_changes() {
        let old = table(&[(1, &[2])]);
        let mut new = old.clone();
        new.owners.insert(
            key(1),
            crate::model::ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
        );
        assert!(diff(&old, &new).is_empty());
    }
}
