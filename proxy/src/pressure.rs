//! Map pressure as the agent reports it: what the dataplane tells about
//! its maps ([`MapEvent`]: a full map, a conntrack sweep) becomes one clear
//! log line and one Warning Event on this agent's Node per problem, not
//! one per retry.
//!
//! - A full map (an insert refused: the frontends that do not fit are not
//!   programmed and retried at every full sync) is reported when it is
//!   first seen, again at most every [`REPEAT`] while it lasts, and its end
//!   is logged once a sync programs everything.
//! - Conntrack is an LRU map written by the data path: it never refuses an
//!   insert, it evicts the least recently used flows. Its fill after each
//!   sweep is watched: [`CT_HIGH_SWEEPS`] sweeps in a row at or above
//!   [`CT_PRESSURE_HIGH`] report it (the flag to raise, and that `auto`
//!   grows it at the next start); it is reported again after falling
//!   below [`CT_PRESSURE_CLEAR`] and rising again, or after [`REPEAT`].

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::dataplane::MapEvent;

/// Conntrack fill (entries / capacity after a sweep) that counts as high.
pub const CT_PRESSURE_HIGH: f64 = 0.9;
/// Conntrack fill below which a reported high pressure is over.
pub const CT_PRESSURE_CLEAR: f64 = 0.8;
/// Sweeps in a row at or above [`CT_PRESSURE_HIGH`] before it is reported
/// (one sweep every 10 s: half a minute).
pub const CT_HIGH_SWEEPS: u32 = 3;
/// A problem that lasts is reported again after this long.
pub const REPEAT: Duration = Duration::from_secs(600);

/// `reason` of the Event for a full map.
pub const REASON_MAP_FULL: &str = "MapFull";
/// `reason` of the Event for conntrack under pressure.
pub const REASON_CT_PRESSURE: &str = "ConntrackPressure";

/// A Warning for this agent's Node (the agent posts it as an Event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeWarning {
    pub reason: &'static str,
    pub map: &'static str,
    pub message: String,
}

/// What the agent remembers between map events.
#[derive(Debug, Default)]
pub struct PressureWatch {
    /// Full maps: when last reported.
    full: BTreeMap<&'static str, Instant>,
    /// Each conntrack map's (`CT_V4`, `CT_V6`) pressure, on its own.
    ct: BTreeMap<&'static str, CtPressure>,
}

/// One conntrack map's pressure between sweeps.
#[derive(Debug, Default)]
struct CtPressure {
    /// Sweeps in a row at or above [`CT_PRESSURE_HIGH`].
    high: u32,
    /// When high pressure was last reported (None: not in this episode).
    reported: Option<Instant>,
}

fn percent(entries: u64, capacity: u32) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        entries as f64 / f64::from(capacity)
    }
}

impl PressureWatch {
    /// The dataplane's map events: logs what is new and returns the
    /// Warnings to post.
    pub fn observe(&mut self, events: Vec<MapEvent>, now: Instant) -> Vec<NodeWarning> {
        let mut out = Vec::new();
        for e in events {
            match e {
                MapEvent::Full {
                    map,
                    capacity,
                    flag,
                    what,
                } => {
                    if self
                        .full
                        .get(map)
                        .is_some_and(|t| now.saturating_duration_since(*t) < REPEAT)
                    {
                        continue;
                    }
                    self.full.insert(map, now);
                    warn!(
                        map,
                        capacity,
                        flag,
                        not_programmed = %what,
                        "map {map} is full ({capacity} entries): {what} and what follows it do not fit and are not programmed (retried at every full sync); raise {flag}"
                    );
                    out.push(NodeWarning {
                        reason: REASON_MAP_FULL,
                        map,
                        message: format!(
                            "eBPF map {map} is full ({capacity} entries): {what} is not programmed; raise {flag}"
                        ),
                    });
                }
                MapEvent::Swept {
                    map,
                    entries,
                    capacity,
                    flag,
                } => {
                    let p = percent(entries, capacity);
                    let ct = self.ct.entry(map).or_default();
                    if p >= CT_PRESSURE_HIGH {
                        ct.high = ct.high.saturating_add(1);
                    } else {
                        ct.high = 0;
                    }
                    if p < CT_PRESSURE_CLEAR && ct.reported.take().is_some() {
                        info!(
                            map,
                            entries,
                            capacity,
                            "conntrack pressure is back below {CT_PRESSURE_CLEAR}"
                        );
                    }
                    let due = ct
                        .reported
                        .is_none_or(|t| now.saturating_duration_since(t) >= REPEAT);
                    if ct.high >= CT_HIGH_SWEEPS && due {
                        ct.reported = Some(now);
                        let pct = (p * 100.0).round();
                        warn!(
                            map,
                            entries,
                            capacity,
                            flag,
                            "conntrack map {map} is {pct}% full ({entries} of {capacity} entries) for {} sweeps: the data path evicts the least recently used flows; raise {flag} (with `auto` the next start grows it)",
                            ct.high
                        );
                        out.push(NodeWarning {
                            reason: REASON_CT_PRESSURE,
                            map,
                            message: format!(
                                "eBPF conntrack map {map} is {pct}% full ({entries} of {capacity} entries): least recently used flows are evicted; raise {flag} (with auto, the next start sizes it to 1.5x the entries it finds)"
                            ),
                        });
                    }
                }
            }
        }
        out
    }

    /// A sync succeeded: every frontend is programmed, so no map is full
    /// any more.
    pub fn sync_succeeded(&mut self) {
        for map in std::mem::take(&mut self.full).into_keys() {
            info!(
                map,
                "map {map} has room again: every frontend is programmed"
            );
        }
    }

    /// Maps reported full and not cleared by a successful sync since.
    pub fn full_maps(&self) -> Vec<&'static str> {
        self.full.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(map: &'static str, what: &str) -> MapEvent {
        MapEvent::Full {
            map,
            capacity: 4,
            flag: "--bpf-lb-map-max",
            what: what.to_owned(),
        }
    }

    fn swept(entries: u64) -> MapEvent {
        swept_map("CT_V4", entries)
    }

    fn swept_map(map: &'static str, entries: u64) -> MapEvent {
        MapEvent::Swept {
            map,
            entries,
            capacity: 1000,
            flag: "--bpf-ct-map-max",
        }
    }

    #[test]
    fn a_full_map_is_reported_once_until_it_clears_or_repeats() {
        let mut w = PressureWatch::default();
        let t0 = Instant::now();
        let out = w.observe(vec![full("SVC_V4", "10.96.0.5:80/TCP")], t0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, REASON_MAP_FULL);
        assert_eq!(
            out[0].message,
            "eBPF map SVC_V4 is full (4 entries): 10.96.0.5:80/TCP is not programmed; raise --bpf-lb-map-max"
        );
        // Retries of the same full map: nothing new.
        for s in 1..10 {
            let t = t0 + Duration::from_secs(s);
            assert!(
                w.observe(vec![full("SVC_V4", "10.96.0.5:80/TCP")], t)
                    .is_empty()
            );
        }
        // Another map is its own problem.
        assert_eq!(w.observe(vec![full("BACKENDS_V4", "x")], t0).len(), 1);
        // Still full after REPEAT: reported again.
        assert_eq!(w.observe(vec![full("SVC_V4", "y")], t0 + REPEAT).len(), 1);
        // A successful sync ends it; filling up again is a new report.
        w.sync_succeeded();
        assert!(w.full_maps().is_empty());
        assert_eq!(
            w.observe(vec![full("SVC_V4", "z")], t0 + REPEAT).len(),
            1,
            "full again after it cleared"
        );
    }

    #[test]
    fn conntrack_is_reported_when_it_stays_high() {
        let mut w = PressureWatch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Two sweeps high, one low: the count starts over.
        assert!(w.observe(vec![swept(950), swept(990)], at(0)).is_empty());
        assert!(w.observe(vec![swept(500)], at(10)).is_empty());
        assert!(w.observe(vec![swept(900), swept(950)], at(20)).is_empty());
        // The third sweep in a row at or above 90%: reported.
        let out = w.observe(vec![swept(1000)], at(30));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].reason, REASON_CT_PRESSURE);
        assert!(
            out[0].message.contains("100% full (1000 of 1000 entries)")
                && out[0].message.contains("raise --bpf-ct-map-max"),
            "{}",
            out[0].message
        );
        // Staying high, or dipping between the thresholds: once.
        assert!(w.observe(vec![swept(1000), swept(850)], at(40)).is_empty());
        assert!(
            w.observe(vec![swept(950), swept(950), swept(950)], at(50))
                .is_empty()
        );
        // Still high after REPEAT: again.
        assert_eq!(w.observe(vec![swept(950)], at(50) + REPEAT).len(), 1);
        // Below the clear threshold, then high again: a new episode.
        assert!(w.observe(vec![swept(100)], at(700)).is_empty());
        assert!(w.observe(vec![swept(950), swept(950)], at(710)).is_empty());
        assert_eq!(w.observe(vec![swept(950)], at(720)).len(), 1);
        // Each conntrack map counts its own sweeps: CT_V6 low does not
        // reset CT_V4's count, nor does CT_V4 high count for CT_V6.
        let mut w = PressureWatch::default();
        for s in 0..2 {
            let e = vec![swept(950), swept_map("CT_V6", 10)];
            assert!(w.observe(e, at(s)).is_empty());
        }
        let out = w.observe(vec![swept(950), swept_map("CT_V6", 10)], at(2));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].map, "CT_V4");
        // A map without capacity is never under pressure.
        let mut w = PressureWatch::default();
        let none = MapEvent::Swept {
            map: "CT_V4",
            entries: 5,
            capacity: 0,
            flag: "--bpf-ct-map-max",
        };
        assert!(
            w.observe(vec![none.clone(), none.clone(), none], t0)
                .is_empty()
        );
    }
}
