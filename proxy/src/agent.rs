//! The agent's sync loop: stores -> model -> frontends -> diff -> dataplane.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::{sync::Notify, time::Instant};
use tracing::{info, warn};

use crate::{
    dataplane::Dataplane,
    diff::diff,
    health::{self, HealthServers, ServiceHealth},
    k8s::Stores,
    lb::LbTable,
    model::{self, NodeContext},
};

/// How long to let a burst of watch events settle before syncing.
const SETTLE: Duration = Duration::from_millis(20);
/// Housekeeping period (new interfaces, ...).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// What one sync did.
pub struct Synced {
    pub changes: usize,
    /// What the health-check node ports must report.
    pub health: BTreeMap<u16, ServiceHealth>,
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
    for e in &errors {
        warn!(kind = e.kind, object = %e.object, field = %e.field, value = %e.value, reason = %e.reason, "cannot program object");
    }
    let desired = LbTable::from_services(&table, &node);
    let changes = diff(&dp.programmed(), &desired);
    let health = health::desired(&table);
    if changes.is_empty() {
        return Ok(Synced { changes: 0, health });
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
    Ok(Synced {
        changes: changes.len(),
        health,
    })
}

/// Run until `shutdown` resolves.
pub async fn run<D: Dataplane>(
    mut dp: D,
    stores: Stores,
    changed: Arc<Notify>,
    node: NodeContext,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    let mut failed = false;
    let mut health_servers = HealthServers::default();
    loop {
        if dirty {
            let start = Instant::now();
            failed = match sync_once(&mut dp, &stores, &node) {
                Ok(s) => {
                    if s.changes > 0 {
                        info!(elapsed_ms = start.elapsed().as_millis() as u64, "sync done");
                    }
                    health_servers.sync(s.health).await;
                    false
                }
                Err(e) => {
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
                    warn!(error = %e, "housekeeping failed");
                }
                dirty = failed;
            }
        }
    }
}
