//! The agent's health and metrics state, as kube-proxy exposes it:
//! `/healthz` and `/livez` answers, and the Prometheus text of `/metrics`
//! (hand-written exposition format 0.0.4). The sync loop reports into
//! [`Telemetry`]; the HTTP handlers ([`crate::http`]) read from it.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    dataplane::{DataplaneStats, StatsReader},
    lb::FrontendKey,
    model::{Protocol, ServicePortName},
};

/// Prefix of this agent's own metrics (kube-proxy's where the meaning is
/// the same keep kube-proxy's names).
pub const PREFIX: &str = "kubeproxy_ebpf";

/// Buckets of the sync duration histogram: kube-proxy's
/// `ExponentialBuckets(0.001, 2, 15)` (1 ms .. 16.4 s).
pub fn sync_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.001 * f64::from(1u32 << i)).collect()
}

/// Buckets of the network programming latency histogram: kube-proxy's
/// (0.25 s, 0.5 s; 1 s steps to 59 s; 5 s steps to 115 s; 30 s steps to
/// 5 min).
pub fn programming_buckets() -> Vec<f64> {
    let linear = |start: f64, width: f64, n: u32| (0..n).map(move |i| start + width * f64::from(i));
    linear(0.25, 0.25, 2)
        .chain(linear(1.0, 1.0, 59))
        .chain(linear(60.0, 5.0, 12))
        .chain(linear(120.0, 30.0, 7))
        .collect()
}

#[derive(Clone, Debug)]
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Histogram {
        let n = bounds.len();
        Histogram {
            bounds,
            counts: vec![0; n],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Health {
    /// Wall clock of the last successful sync (kube-proxy's lastUpdated).
    last_updated: Option<SystemTime>,
    /// Since when syncs have been failing (the dataplane refuses updates).
    sync_failing_since: Option<Instant>,
}

/// Since when a change has been pending (a change not yet synced, or an
/// unreachable API server); None: nothing pending.
pub type PendingSource = Box<dyn Fn() -> Option<Instant> + Send + Sync>;

/// The change tracker's counts, read at every scrape.
pub type ChangeSource = Box<dyn Fn() -> crate::changes::ChangeCounts + Send + Sync>;

#[derive(Debug)]
struct State {
    sync_duration: Histogram,
    /// From an EndpointSlice's trigger time to the sync that programmed it.
    programming: Histogram,
    /// Service ports with a Local traffic policy, endpoints, and none on
    /// this node: [internal, external].
    no_local: [usize; 2],
    syncs: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    last_sync_ts: f64,
    services: usize,
    frontends: usize,
    endpoints: usize,
    invalid_objects: usize,
    /// Map-pressure warnings (map, reason) -> how many were raised.
    map_warnings: BTreeMap<(String, &'static str), u64>,
    /// Frontend -> service port name, for labels (the names are shared
    /// with the sync loop's state: one entry is a key and a pointer).
    owners: HashMap<FrontendKey, std::sync::Arc<ServicePortName>>,
}

/// How a sync changed which service port owns which frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerChanges {
    /// Forget every owner first (a full rebuild lists them all).
    pub reset: bool,
    /// Frontend -> its service port name now (None: the frontend is
    /// gone).
    pub changes: Vec<(FrontendKey, Option<std::sync::Arc<ServicePortName>>)>,
}

/// Health answer: HTTP status and kube-proxy's JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthAnswer {
    pub healthy: bool,
    pub body: String,
}

/// Health and metrics shared by the sync loop and the HTTP servers.
pub struct Telemetry {
    mode: &'static str,
    /// Staleness limit: a change pending longer than this is unhealthy
    /// (kube-proxy: 2 x the sync period).
    timeout: Duration,
    health: Mutex<Health>,
    state: Mutex<State>,
    reader: Mutex<Option<Box<dyn StatsReader>>>,
    pending: Mutex<Option<PendingSource>>,
    changes: Mutex<Option<ChangeSource>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Telemetry {
    /// `mode` is what `/proxyMode` answers; `sync_period` sets the
    /// staleness limit (2x, as kube-proxy's healthz).
    pub fn new(mode: &'static str, sync_period: Duration) -> Telemetry {
        Telemetry {
            mode,
            timeout: sync_period * 2,
            health: Mutex::default(),
            state: Mutex::new(State {
                sync_duration: Histogram::new(sync_buckets()),
                programming: Histogram::new(programming_buckets()),
                no_local: [0; 2],
                syncs: BTreeMap::new(),
                errors: BTreeMap::new(),
                last_sync_ts: 0.0,
                services: 0,
                frontends: 0,
                endpoints: 0,
                invalid_objects: 0,
                map_warnings: BTreeMap::new(),
                owners: HashMap::new(),
            }),
            reader: Mutex::new(None),
            pending: Mutex::new(None),
            changes: Mutex::new(None),
        }
    }

    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Where dataplane counters come from (None: the mode has none).
    pub fn set_reader(&self, reader: Option<Box<dyn StatsReader>>) {
        *lock(&self.reader) = reader;
    }

    /// A sync that left the dataplane equal to the desired state.
    /// `owners`: how the frontend -> service port map changed (only the
    /// frontends the sync touched, or all of them after a reset).
    pub fn sync_succeeded(
        &self,
        took: Duration,
        services: usize,
        endpoints: usize,
        owners: OwnerChanges,
    ) {
        let now = SystemTime::now();
        {
            let mut h = lock(&self.health);
            h.last_updated = Some(now);
            h.sync_failing_since = None;
        }
        let mut s = lock(&self.state);
        s.sync_duration.observe(took.as_secs_f64());
        *s.syncs.entry("success").or_default() += 1;
        s.last_sync_ts = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        s.services = services;
        s.endpoints = endpoints;
        if owners.reset {
            s.owners = HashMap::new();
        }
        for (frontend, owner) in owners.changes {
            match owner {
                Some(o) => s.owners.insert(frontend, o),
                None => s.owners.remove(&frontend),
            };
        }
        s.frontends = s.owners.len();
    }

    /// Frontend (`ip:port/PROTO`) -> service port name as the syncs so
    /// far left it.
    pub fn owners(&self) -> HashMap<String, String> {
        lock(&self.state)
            .owners
            .iter()
            .map(|(k, o)| (k.to_string(), o.to_string()))
            .collect()
    }

    /// A successful sync programmed EndpointSlice changes triggered at
    /// `trigger_times` (kube-proxy's network programming latency: from the
    /// trigger to now; a clock that went backwards counts 0).
    pub fn programmed(&self, trigger_times: &[SystemTime]) {
        if trigger_times.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let mut s = lock(&self.state);
        for t in trigger_times {
            let took = now.duration_since(*t).unwrap_or_default();
            s.programming.observe(took.as_secs_f64());
        }
    }

    /// Service ports with a Local traffic policy and endpoints, none of
    /// them on this node, per policy (internal, external).
    pub fn set_no_local_endpoints(&self, internal: usize, external: usize) {
        lock(&self.state).no_local = [internal, external];
    }

    /// A sync the dataplane refused (retried).
    pub fn sync_failed(&self, took: Duration) {
        {
            let mut h = lock(&self.health);
            h.sync_failing_since.get_or_insert_with(Instant::now);
        }
        let mut s = lock(&self.state);
        s.sync_duration.observe(took.as_secs_f64());
        *s.syncs.entry("error").or_default() += 1;
        *s.errors.entry("sync".to_owned()).or_default() += 1;
    }

    /// Problems (object, field, value) the last sync could not program.
    pub fn set_invalid_objects(&self, n: usize) {
        lock(&self.state).invalid_objects = n;
    }

    /// Count a map-pressure warning (a full map, conntrack under
    /// pressure: [`crate::pressure`]) about `map`.
    pub fn map_warning(&self, map: &str, reason: &'static str) {
        *lock(&self.state)
            .map_warnings
            .entry((map.to_owned(), reason))
            .or_default() += 1;
    }

    /// Count an error of `kind` (`sync`, `housekeeping`, `event`,
    /// `metrics_read`, or another).
    pub fn error(&self, kind: &str, n: u64) {
        *lock(&self.state).errors.entry(kind.to_owned()).or_default() += n;
    }

    /// Where `/healthz` learns since when a change has been pending (read at
    /// every request, so a stuck sync loop shows too).
    pub fn set_pending_source(&self, f: PendingSource) {
        *lock(&self.pending) = Some(f);
    }

    /// Where `/metrics` reads kube-proxy's change counts.
    pub fn set_change_source(&self, f: ChangeSource) {
        *lock(&self.changes) = Some(f);
    }

    /// `/healthz`: 200 while syncs succeed and nothing has been pending (a
    /// change not yet synced, a failing sync, an unreachable API server)
    /// longer than 2x the sync period; 503 before the first sync and when
    /// stale.
    pub fn healthz(&self) -> HealthAnswer {
        let pending = lock(&self.pending).as_ref().and_then(|f| f());
        let h = lock(&self.health);
        let stale = |since: Option<Instant>| since.is_some_and(|t| t.elapsed() > self.timeout);
        let healthy = h.last_updated.is_some() && !stale(h.sync_failing_since) && !stale(pending);
        answer(healthy, h.last_updated)
    }

    /// `/livez`: like `/healthz`, except that an unreachable API server
    /// does not count (restarting the agent would not bring it back).
    pub fn livez(&self) -> HealthAnswer {
        let h = lock(&self.health);
        let healthy = h
            .sync_failing_since
            .is_none_or(|t| t.elapsed() <= self.timeout);
        answer(healthy, h.last_updated)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let dp = {
            let r = lock(&self.reader);
            match r.as_ref().map(|r| r.read()) {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading dataplane statistics");
                    self.error("metrics_read", 1);
                    None
                }
                None => None,
            }
        };
        let changes = lock(&self.changes).as_ref().map(|f| f());
        let s = lock(&self.state);
        let mut out = render(&s, self.mode, dp.as_ref());
        if let Some(c) = changes {
            render_changes(&mut out, &c);
        }
        out
    }
}

fn answer(healthy: bool, last: Option<SystemTime>) -> HealthAnswer {
    let body = serde_json::json!({
        "lastUpdated": last.map(rfc3339).unwrap_or_else(|| rfc3339(UNIX_EPOCH)),
        "currentTime": rfc3339(SystemTime::now()),
    })
    .to_string();
    HealthAnswer { healthy, body }
}

/// RFC 3339 in UTC with nanoseconds, trailing zeros trimmed (Go's
/// RFC3339Nano, which kube-proxy's JSON uses).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Label value escaping of the text format: backslash, quote, newline.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// kube-proxy's change metrics, with its names and meanings.
fn render_changes(o: &mut String, c: &crate::changes::ChangeCounts) {
    for (name, kind, help, value) in [
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
            "Pending proxy rules Service changes (services whose Service object changed since the last sync)",
            c.service_pending as u64,
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
            "Cumulative proxy rules Service changes",
            c.service_total,
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
            "Pending proxy rules Endpoint changes (services whose EndpointSlices changed since the last sync)",
            c.endpoint_pending as u64,
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
            "Cumulative proxy rules Endpoint changes",
            c.endpoint_total,
        ),
    ] {
        header(o, name, kind, help);
        let _ = writeln!(o, "{name} {value}");
    }
    let name = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
    header(
        o,
        name,
        "gauge",
        "The last time a sync of proxy rules was queued (Unix seconds)",
    );
    let ts = c
        .last_queued
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let _ = writeln!(o, "{name} {}", fmt_f64(ts));
}

fn histogram(o: &mut String, name: &str, help: &str, h: &Histogram) {
    header(o, name, "histogram", help);
    for (b, c) in h.bounds.iter().zip(&h.counts) {
        let _ = writeln!(o, "{name}_bucket{{le=\"{}\"}} {c}", fmt_f64(*b));
    }
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(o, "{name}_sum {}", fmt_f64(h.sum));
    let _ = writeln!(o, "{name}_count {}", h.count);
}

fn render(s: &State, mode: &str, dp: Option<&DataplaneStats>) -> String {
    let mut o = String::new();
    // kube-proxy's names and meanings: time of one sync of the rules; time
    // from an EndpointSlice change's trigger to the sync that programmed it.
    histogram(
        &mut o,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "SyncProxyRules latency in seconds (one sync: model, diff and dataplane update)",
        &s.sync_duration,
    );
    histogram(
        &mut o,
        "kubeproxy_network_programming_duration_seconds",
        "In Cluster Network Programming Latency in seconds (EndpointSlice last-change-trigger-time to programmed)",
        &s.programming,
    );
    let name = "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
    header(
        &mut o,
        name,
        "gauge",
        "Number of services with a Local traffic policy and no endpoints on this node",
    );
    for (policy, n) in ["internal", "external"].iter().zip(s.no_local) {
        let _ = writeln!(o, "{name}{{traffic_policy=\"{policy}\"}} {n}");
    }

    let name = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
    header(
        &mut o,
        name,
        "gauge",
        "The last time a sync of the rules succeeded (Unix seconds)",
    );
    let _ = writeln!(o, "{name} {}", fmt_f64(s.last_sync_ts));

    let name = format!("{PREFIX}_syncs_total");
    header(&mut o, &name, "counter", "Syncs by result (success, error)");
    for result in ["success", "error"] {
        let _ = writeln!(
            o,
            "{name}{{result=\"{result}\"}} {}",
            s.syncs.get(result).copied().unwrap_or(0)
        );
    }

    let name = format!("{PREFIX}_errors_total");
    header(
        &mut o,
        &name,
        "counter",
        "Errors by kind: sync (dataplane update failed), housekeeping, event (posting a Kubernetes Event failed), metrics_read",
    );
    const KINDS: [&str; 4] = ["sync", "housekeeping", "event", "metrics_read"];
    for kind in KINDS {
        let _ = writeln!(
            o,
            "{name}{{kind=\"{kind}\"}} {}",
            s.errors.get(kind).copied().unwrap_or(0)
        );
    }
    for (kind, n) in s
        .errors
        .iter()
        .filter(|(k, _)| !KINDS.contains(&k.as_str()))
    {
        let _ = writeln!(o, "{name}{{kind=\"{}\"}} {n}", esc(kind));
    }

    for (metric, help, v) in [
        (
            "programmed_services",
            "Service ports programmed",
            s.services,
        ),
        (
            "programmed_frontends",
            "Frontends (address, port, protocol) programmed",
            s.frontends,
        ),
        (
            "programmed_endpoints",
            "Distinct endpoints (address, port) programmed as backends",
            s.endpoints,
        ),
        (
            "invalid_objects",
            "Problems (object, field, value) the last sync could not program",
            s.invalid_objects,
        ),
    ] {
        let name = format!("{PREFIX}_{metric}");
        header(&mut o, &name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }

    let name = format!("{PREFIX}_map_pressure_warnings_total");
    header(
        &mut o,
        &name,
        "counter",
        "Map-pressure warnings raised (logged and posted as a Warning Event on the Node), by map and reason: MapFull (an insert refused), ConntrackPressure (conntrack stays at or above 90% full)",
    );
    for ((map, reason), n) in &s.map_warnings {
        let _ = writeln!(o, "{name}{{map=\"{}\",reason=\"{reason}\"}} {n}", esc(map));
    }

    let name = format!("{PREFIX}_info");
    header(&mut o, &name, "gauge", "The proxy mode in use");
    let _ = writeln!(o, "{name}{{mode=\"{}\"}} 1", esc(mode));

    let Some(dp) = dp else {
        return o;
    };
    if !dp.maps.is_empty() {
        let name = format!("{PREFIX}_map_entries");
        header(&mut o, &name, "gauge", "Entries in each dataplane map");
        for m in &dp.maps {
            let _ = writeln!(o, "{name}{{map=\"{}\"}} {}", esc(&m.name), m.entries);
        }
        let name = format!("{PREFIX}_map_capacity");
        header(
            &mut o,
            &name,
            "gauge",
            "Capacity (max entries) of each dataplane map",
        );
        for m in &dp.maps {
            let _ = writeln!(o, "{name}{{map=\"{}\"}} {}", esc(&m.name), m.capacity);
        }
        let name = format!("{PREFIX}_map_pressure");
        header(
            &mut o,
            &name,
            "gauge",
            "Fill of each dataplane map, entries / capacity (Cilium's bpf_map_pressure): a hash map at 1 refuses inserts, an LRU map at 1 evicts; LRU maps are counted at most every 30 s (conntrack: at every sweep)",
        );
        for m in &dp.maps {
            let _ = writeln!(
                o,
                "{name}{{map=\"{}\"}} {}",
                esc(&m.name),
                fmt_f64(m.pressure())
            );
        }
        let name = format!("{PREFIX}_map_insert_failures_total");
        header(
            &mut o,
            &name,
            "counter",
            "Inserts into each dataplane map that failed (a full map: raise its capacity flag)",
        );
        for m in &dp.maps {
            let _ = writeln!(
                o,
                "{name}{{map=\"{}\"}} {}",
                esc(&m.name),
                m.insert_failures
            );
        }
    }
    if let Some(ct) = &dp.conntrack {
        let name = format!("{PREFIX}_conntrack_entries");
        header(&mut o, &name, "gauge", "Connection-tracking entries");
        let _ = writeln!(o, "{name} {}", ct.entries);
        let name = format!("{PREFIX}_conntrack_capacity");
        header(&mut o, &name, "gauge", "Connection-tracking capacity");
        let _ = writeln!(o, "{name} {}", ct.capacity);
    }
    for (metric, help, pick) in [
        (
            "service_packets_total",
            "Packets (per-packet paths) or connections/sends (socket path) translated, per frontend",
            (|f: &crate::dataplane::FrontendCounters| f.packets) as fn(&_) -> u64,
        ),
        (
            "service_bytes_total",
            "Bytes of translated packets (per-packet paths), per frontend",
            |f| f.bytes,
        ),
    ] {
        let name = format!("{PREFIX}_{metric}");
        header(&mut o, &name, "counter", help);
        for f in &dp.frontends {
            let service = parse_frontend(&f.frontend)
                .and_then(|k| s.owners.get(&k))
                .map(|o| o.to_string())
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "{name}{{frontend=\"{}\",kind=\"{}\",service=\"{}\"}} {}",
                esc(&f.frontend),
                esc(&f.kind),
                esc(&service),
                pick(f)
            );
        }
    }
    let name = format!("{PREFIX}_drops_total");
    header(
        &mut o,
        &name,
        "counter",
        "Packets dropped by the data path, by reason",
    );
    for (reason, v) in &dp.drops {
        let _ = writeln!(o, "{name}{{reason=\"{}\"}} {v}", esc(reason));
    }
    let name = format!("{PREFIX}_datapath_total");
    header(
        &mut o,
        &name,
        "counter",
        "Other data-path counters (packets seen, DNAT, reverse NAT, rejects, passes, socket translations), by name",
    );
    for (counter, v) in &dp.counters {
        let _ = writeln!(o, "{name}{{counter=\"{}\"}} {v}", esc(counter));
    }
    if !dp.sock_destroyed.is_empty() {
        let name = format!("{PREFIX}_sock_destroyed_total");
        header(
            &mut o,
            &name,
            "counter",
            "Sockets destroyed because socket LB had connected them to a backend that left its service (--bpf-lb-sock-terminate), by protocol",
        );
        for (proto, v) in &dp.sock_destroyed {
            let _ = writeln!(o, "{name}{{proto=\"{}\"}} {v}", esc(proto));
        }
        let name = format!("{PREFIX}_sock_destroy_failures_total");
        header(
            &mut o,
            &name,
            "counter",
            "Socket-destroy runs that failed (kernel without bpf_sock_destroy, a netns that could not be entered)",
        );
        let _ = writeln!(o, "{name} {}", dp.sock_destroy_failures);
    }
    o
}

/// `ip:port/PROTO` or `[ip6]:port/PROTO` (as [`FrontendKey`] displays)
/// back into the key.
fn parse_frontend(s: &str) -> Option<FrontendKey> {
    let (addr, proto) = s.rsplit_once('/')?;
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    Some(FrontendKey {
        addr: sa.ip(),
        port: sa.port(),
        proto: Protocol::parse(proto)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FrontendCounters, MapFill};

    struct Fixed(DataplaneStats);
    impl StatsReader for Fixed {
        fn read(&self) -> Result<DataplaneStats, Box<dyn std::error::Error + Send + Sync>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn rfc3339_like_go() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 120_000_000);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.12Z");
    }

    #[test]
    fn health_needs_a_sync_and_goes_stale() {
        let t = Telemetry::new("ebpf", Duration::from_millis(5));
        assert!(!t.healthz().healthy, "no sync yet");
        assert!(t.livez().healthy);
        t.sync_succeeded(Duration::from_millis(1), 1, 1, OwnerChanges::default());
        let a = t.healthz();
        assert!(a.healthy);
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
        assert!(v["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')));
        assert!(v["currentTime"].is_string());
        let since = std::sync::Arc::new(Mutex::new(Some(Instant::now())));
        let s2 = since.clone();
        t.set_pending_source(Box::new(move || *lock(&s2)));
        assert!(t.healthz().healthy, "not yet stale");
        std::thread::sleep(Duration::from_millis(15));
        assert!(!t.healthz().healthy, "pending longer than 2x the period");
        assert!(t.livez().healthy, "livez ignores the API server");
        *lock(&since) = None;
        assert!(t.healthz().healthy);
        t.sync_failed(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(15));
        assert!(!t.healthz().healthy);
        assert!(!t.livez().healthy);
    }

    #[test]
    fn owners_follow_the_deltas_and_a_reset() {
        let t = Telemetry::new("ebpf", Duration::from_secs(30));
        let fk = |last: u8| FrontendKey {
            addr: std::net::Ipv4Addr::new(10, 96, 0, last).into(),
            port: 80,
            proto: Protocol::Tcp,
        };
        let spn = |name: &str| {
            std::sync::Arc::new(ServicePortName {
                namespace: "default".into(),
                name: name.into(),
                port: String::new(),
                protocol: Protocol::Tcp,
            })
        };
        let owned = |f: u8, o: Option<&str>| (fk(f), o.map(spn));
        t.sync_succeeded(
            Duration::ZERO,
            2,
            2,
            OwnerChanges {
                reset: true,
                changes: vec![owned(1, Some("x")), owned(2, Some("y"))],
            },
        );
        t.sync_succeeded(
            Duration::ZERO,
            2,
            2,
            OwnerChanges {
                reset: false,
                changes: vec![owned(1, None), owned(2, Some("z")), owned(3, Some("x"))],
            },
        );
        let mut o: Vec<(String, String)> = t.owners().into_iter().collect();
        o.sort();
        assert_eq!(
            o,
            [
                ("10.96.0.2:80/TCP".to_owned(), "default/z/TCP".to_owned()),
                ("10.96.0.3:80/TCP".to_owned(), "default/x/TCP".to_owned())
            ]
        );
        assert!(
            t.render().contains("kubeproxy_ebpf_programmed_frontends 2"),
            "{}",
            t.render()
        );
        t.sync_succeeded(
            Duration::ZERO,
            1,
            1,
            OwnerChanges {
                reset: true,
                changes: vec![owned(4, Some("w"))],
            },
        );
        assert_eq!(t.owners().len(), 1);
        assert_eq!(parse_frontend("10.96.0.4:80/TCP"), Some(fk(4)));
        assert_eq!(parse_frontend("10.96.0.4:80"), None);
        let six = parse_frontend("[fd00:96::4]:80/UDP").expect("an IPv6 frontend");
        assert_eq!(six.to_string(), "[fd00:96::4]:80/UDP");
    }

    #[test]
    fn metrics_text() {
        let t = Telemetry::new("ebpf", Duration::from_secs(30));
        t.sync_succeeded(
            Duration::from_millis(3),
            1,
            2,
            OwnerChanges {
                reset: true,
                changes: vec![(
                    FrontendKey {
                        addr: std::net::Ipv4Addr::new(10, 96, 0, 10).into(),
                        port: 80,
                        proto: Protocol::Tcp,
                    },
                    Some(std::sync::Arc::new(ServicePortName {
                        namespace: "default".into(),
                        name: "web".into(),
                        port: String::new(),
                        protocol: Protocol::Tcp,
                    })),
                )],
            },
        );
        t.error("event", 2);
        t.set_invalid_objects(3);
        t.map_warning("SVC_V4", "MapFull");
        t.map_warning("SVC_V4", "MapFull");
        t.set_reader(Some(Box::new(Fixed(DataplaneStats {
            maps: vec![
                MapFill {
                    name: "SVC_V4".into(),
                    entries: 1,
                    capacity: 65536,
                    insert_failures: 5,
                },
                MapFill {
                    name: "CT_V4".into(),
                    entries: 4,
                    capacity: 8,
                    insert_failures: 0,
                },
            ],
            conntrack: Some(MapFill {
                name: "CT_V4".into(),
                entries: 4,
                capacity: 8,
                insert_failures: 0,
            }),
            frontends: vec![FrontendCounters {
                frontend: "10.96.0.10:80/TCP".into(),
                kind: "ClusterIP".into(),
                packets: 7,
                bytes: 700,
            }],
            drops: vec![("source_range".into(), 3)],
            counters: vec![("dnat".into(), 9)],
            sock_destroyed: vec![("tcp".into(), 0), ("udp".into(), 4)],
            sock_destroy_failures: 1,
        }))));
        t.set_change_source(Box::new(|| crate::changes::ChangeCounts {
            service_pending: 1,
            endpoint_pending: 2,
            service_total: 3,
            endpoint_total: 4,
            last_queued: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        }));
        let m = t.render();
        for line in [
            "kubeproxy_sync_proxy_rules_service_changes_pending 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 2",
            "kubeproxy_sync_proxy_rules_service_changes_total 3",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 4",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds 1700000000",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "kubeproxy_ebpf_errors_total{kind=\"event\"} 2",
            "kubeproxy_ebpf_invalid_objects 3",
            "kubeproxy_ebpf_map_pressure_warnings_total{map=\"SVC_V4\",reason=\"MapFull\"} 2",
            "kubeproxy_ebpf_programmed_endpoints 2",
            "kubeproxy_ebpf_programmed_frontends 1",
            "kubeproxy_ebpf_map_capacity{map=\"SVC_V4\"} 65536",
            "kubeproxy_ebpf_map_insert_failures_total{map=\"SVC_V4\"} 5",
            "kubeproxy_ebpf_map_pressure{map=\"SVC_V4\"} 0.0000152587890625",
            "kubeproxy_ebpf_map_pressure{map=\"CT_V4\"} 0.5",
            "kubeproxy_ebpf_conntrack_entries 4",
            "kubeproxy_ebpf_service_packets_total{frontend=\"10.96.0.10:80/TCP\",kind=\"ClusterIP\",service=\"default/web/TCP\"} 7",
            "kubeproxy_ebpf_service_bytes_total{frontend=\"10.96.0.10:80/TCP\",kind=\"ClusterIP\",service=\"default/web/TCP\"} 700",
            "kubeproxy_ebpf_drops_total{reason=\"source_range\"} 3",
            "kubeproxy_ebpf_sock_destroyed_total{proto=\"udp\"} 4",
            "kubeproxy_ebpf_sock_destroy_failures_total 1",
            "kubeproxy_ebpf_datapath_total{counter=\"dnat\"} 9",
            "kubeproxy_ebpf_info{mode=\"ebpf\"} 1",
        ] {
            assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
        }
        // Every sample's metric has a TYPE line.
        for l in m.lines().filter(|l| !l.starts_with('#')) {
            let metric = l.split(['{', ' ']).next().unwrap_or_default();
            let base = metric
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                m.contains(&format!("# TYPE {base} ")) || m.contains(&format!("# TYPE {metric} ")),
                "{metric} has no TYPE"
            );
        }
        assert_eq!(esc("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
