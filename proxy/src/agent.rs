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

/// Agent limits a sync enforces on what objects ask for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `--maglev-max-table-size`: the largest Maglev table size a Service
    /// may ask for with [`model::ANNOTATION_MAGLEV_TABLE_SIZE`].
    pub maglev_max_table_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            maglev_max_table_size: crate::maglev::DEFAULT_MAX_ANNOTATED_SIZE,
        }
    }
}

/// Service ports asking for a Maglev table larger than `max` get the
/// default size instead; one error per Service.
pub fn cap_maglev_sizes(table: &mut model::ServiceTable, max: u32) -> Vec<ModelError> {
    let mut errors: Vec<ModelError> = Vec::new();
    for (name, port) in table.services.iter_mut() {
        let Some(size) = port.maglev_table_size.filter(|s| *s > max) else {
            continue;
        };
        port.maglev_table_size = None;
        let object = format!("{}/{}", name.namespace, name.name);
        if errors.iter().any(|e| e.object == object) {
            continue;
        }
        errors.push(ModelError {
            kind: "Service",
            object,
            field: format!(
                "metadata.annotations[{}]",
                model::ANNOTATION_MAGLEV_TABLE_SIZE
            ),
            value: size.to_string(),
            reason: format!(
                "larger than --maglev-max-table-size {max}; the default table size is used"
            ),
        });
    }
    errors
}

/// The address north-south flows to remote backends are SNATed to (and
/// DSR answers from): the node's first address, as the Node object lists
/// it now.
pub fn node_address(node: &NodeContext) -> Option<std::net::Ipv4Addr> {
    node.addresses.first().copied()
}

/// One sync: read the stores, build the desired table, apply the diff.
pub fn sync_once<D: Dataplane>(
    dp: &mut D,
    stores: &Stores,
    node: &NodeContext,
    limits: &Limits,
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
    let (mut table, errs) = model::build(
        services.iter().map(|s| s.as_ref()),
        slices.iter().map(|s| s.as_ref()),
        &node,
    );
    errors.extend(errs);
    errors.extend(cap_maglev_sizes(&mut table, limits.maglev_max_table_size));
    // The node address follows the Node object (before frontends that
    // may need it for SNAT).
    dp.set_node_address(node_address(&node))?;
    let desired = LbTable::from_services(&table, &node);
    let changes = diff(dp.programmed(), &desired);
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
    pub limits: Limits,
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
            failed = match sync_once(&mut dp, &stores, &node, &opts.limits) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePort, ServicePortName, ServiceTable, ServiceType};

    fn port(name: &str, port: &str, size: Option<u32>) -> (ServicePortName, ServicePort) {
        let n = ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        };
        let p = ServicePort {
            name: n.clone(),
            service_type: ServiceType::NodePort,
            cluster_ips: vec![],
            port: 80,
            node_port: Some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![],
            affinity_timeout: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
            source_ranges: vec![],
            maglev_table_size: size,
            endpoints: vec![],
        };
        (n, p)
    }

    #[test]
    fn maglev_sizes_above_the_flag_are_reported_once_per_service_and_dropped() {
        let mut t = ServiceTable::default();
        t.services.extend([
            port("big", "http", Some(65_537)),
            port("big", "https", Some(65_537)),
            port("ok", "", Some(251)),
        ]);
        let errors = cap_maglev_sizes(&mut t, 16_381);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.object, "default/big");
        assert_eq!(
            e.field,
            "metadata.annotations[kube-proxy-ebpf.io/maglev-table-size]"
        );
        assert_eq!(e.value, "65537");
        assert!(e.reason.contains("--maglev-max-table-size 16381"), "{e:?}");
        let sizes: Vec<Option<u32>> = t.services.values().map(|p| p.maglev_table_size).collect();
        assert_eq!(sizes, vec![None, None, Some(251)], "default size instead");
        // At the limit is fine.
        let mut t = ServiceTable::default();
        t.services.extend([port("edge", "", Some(16_381))]);
        assert!(cap_maglev_sizes(&mut t, 16_381).is_empty());
    }

    #[test]
    fn the_node_address_is_the_nodes_first() {
        let node = NodeContext {
            addresses: vec![
                std::net::Ipv4Addr::new(172, 18, 0, 3),
                std::net::Ipv4Addr::new(192, 0, 2, 1),
            ],
            ..Default::default()
        };
        assert_eq!(
            node_address(&node),
            Some(std::net::Ipv4Addr::new(172, 18, 0, 3))
        );
        assert_eq!(node_address(&NodeContext::default()), None);
    }
}
