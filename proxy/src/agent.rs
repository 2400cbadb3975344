//! The agent's sync loop: stores -> model -> frontends -> diff -> dataplane.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{sync::Notify, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    dataplane::Dataplane,
    diff::diff,
    events::EventRecorder,
    health::{self, HealthServers, ServiceHealth},
    k8s::Stores,
    lb::LbTable,
    metrics::Telemetry,
    model::{self, ModelError, NodeContext},
};

/// How long to let a burst of watch events settle before syncing.
const SETTLE: Duration = Duration::from_millis(20);
/// Housekeeping period (new interfaces, ...).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// kube-proxy's default `syncPeriod`.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// What one sync did.
pub struct Synced {
    pub changes: usize,
    /// What the health-check node ports must report.
    pub health: BTreeMap<u16, ServiceHealth>,
    /// Objects (or parts) that could not be programmed.
    pub errors: Vec<ModelError>,
    /// Service ports in the desired state.
    pub services: usize,
    /// Distinct backends (address, port) in the desired state.
    pub endpoints: usize,
    /// Frontend (`ip:port/PROTO`) -> service port name.
    pub owners: BTreeMap<String, String>,
}

/// One sync: read the stores, build the desired table, apply the diff.
pub fn sync_once<D: Dataplane>(
    dp: &mut D,
    stores: &Stores,
    node: &NodeContext,
) -> Result<Synced, D::Error> {
    let services = stores.services.state();
    let slices = stores.slices.state();
    let mut node = node.clone();
    let mut errors = Vec::new();
    if let Some(n) = stores.nodes.state().first() {
        let (addresses, errs) = model::node_addresses(n);
        node.addresses = addresses;
        errors.extend(errs);
    }
    let (table, errs) = model::build(
        services.iter().map(|s| s.as_ref()),
        slices.iter().map(|s| s.as_ref()),
        &node,
    );
    errors.extend(errs);
    let desired = LbTable::from_services(&table, &node);
    let changes = diff(&dp.programmed(), &desired);
    let endpoints: std::collections::BTreeSet<_> = desired
        .frontends
        .values()
        .flat_map(|f| f.backends.iter().map(|b| (b.addr, b.port)))
        .collect();
    let mut synced = Synced {
        changes: changes.len(),
        health: health::desired(&table),
        errors,
        services: table.services.len(),
        endpoints: endpoints.len(),
        owners: desired
            .owners
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    if changes.is_empty() {
        return Ok(synced);
    }
    let stats = dp.apply(&changes)?;
    info!(
        changes = changes.len(),
        upserted = stats.upserted,
        removed = stats.removed,
        backends_added = stats.backends_added,
        backends_removed = stats.backends_removed,
        "synced"
    );
    synced.changes = changes.len();
    Ok(synced)
}

/// What [`run`] needs besides the dataplane and the stores.
pub struct RunOptions {
    /// Full resync period (kube-proxy's `syncPeriod`); also sets when
    /// `/healthz` calls the agent stale (2x).
    pub sync_period: Duration,
    pub telemetry: Arc<Telemetry>,
    /// Kubernetes Events for objects that cannot be programmed.
    pub events: Option<EventRecorder>,
}

/// Run until `shutdown` resolves.
pub async fn run<D: Dataplane>(
    mut dp: D,
    stores: Stores,
    changed: Arc<Notify>,
    node: NodeContext,
    mut opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    let mut failed = false;
    let mut last_sync = Instant::now();
    let mut health_servers = HealthServers::default();
    let mut problems = std::collections::HashSet::new();
    let telemetry = opts.telemetry.clone();
    telemetry.set_reader(dp.stats_reader());
    let wh = stores.watch_health.clone();
    telemetry.set_pending_source(Box::new(move || wh.stale_since()));
    loop {
        if dirty {
            let start = Instant::now();
            last_sync = start;
            // Every change queued so far is in the stores this sync reads.
            stores.watch_health.take_pending();
            failed = match sync_once(&mut dp, &stores, &node) {
                Ok(s) => {
                    if s.changes > 0 {
                        info!(elapsed_ms = start.elapsed().as_millis() as u64, "sync done");
                    }
                    telemetry.sync_succeeded(start.elapsed(), s.services, s.endpoints, s.owners);
                    telemetry.set_invalid_objects(s.errors.len());
                    // Warn once per problem while it lasts (syncs repeat
                    // every period); debug on later syncs.
                    let now_problems: std::collections::HashSet<String> =
                        s.errors.iter().map(|e| e.to_string()).collect();
                    for e in &s.errors {
                        if problems.contains(&e.to_string()) {
                            debug!(kind = e.kind, object = %e.object, field = %e.field, value = %e.value, reason = %e.reason, "cannot program object");
                        } else {
                            warn!(kind = e.kind, object = %e.object, field = %e.field, value = %e.value, reason = %e.reason, "cannot program object");
                        }
                    }
                    problems = now_problems;
                    if let Some(ev) = opts.events.as_mut() {
                        ev.report(&s.errors);
                    }
                    health_servers.sync(s.health).await;
                    false
                }
                Err(e) => {
                    telemetry.sync_failed(start.elapsed());
                    warn!(error = %e, "sync failed; retrying on the next event or tick");
                    true
                }
            };
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = changed.notified() => {
                tokio::time::sleep(SETTLE).await;
                dirty = true;
            }
            _ = tick.tick() => {
                if let Err(e) = dp.housekeeping() {
                    telemetry.error("housekeeping", 1);
                    warn!(error = %e, "housekeeping failed");
                }
                // Periodic full resync, as kube-proxy's syncPeriod.
                dirty = failed || last_sync.elapsed() >= opts.sync_period;
            }
        }
    }
}
