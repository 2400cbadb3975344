//! Kubernetes side: watches of Services, EndpointSlices and this Node.
//! Feeds the cache and change tracker ([`crate::changes`]) and a change
//! signal; knows nothing of dataplanes.

use std::{fmt::Debug, path::Path, sync::Arc, time::Instant};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::{
    changes::{Batch, Cache},
    model::{self, SliceView, WATCH_LABEL_SELECTOR},
};

pub mod backoff;

/// EndpointSlices are watched as [`SliceView`]: only the fields the model
/// reads are deserialized and kept (about 80 bytes an endpoint where a
/// k8s-openapi `Endpoint` takes 352 before its strings).
impl Resource for SliceView {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no kubeconfig given and no in-cluster configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `--kubeconfig`, or in-cluster / default config without one.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| K8sError::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| K8sError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    // No request-level retries of 429/503/504: kube's default retries a
    // request for many minutes, which would hide an unavailable API server
    // from the watchers (they back off and retry on their own) and so from
    // /healthz.
    let mut config = config;
    config.default_retry = false;
    Ok(Client::try_from(config)?)
}

/// The cache of the objects the model reads, with its change tracker
/// (filled by the watch tasks, taken by the sync loop).
#[derive(Clone)]
pub struct Stores {
    pub cache: Arc<std::sync::Mutex<Cache>>,
    /// Whether the watches reach the API server.
    pub watch_health: WatchHealth,
}

/// Per watched kind, since when its watch has been failing (None: fine).
/// A failing watch means changes may be pending that the agent cannot see.
/// Also since when a change has been waiting for a sync (kube-proxy's
/// "queued update"): set by watch events, taken by the sync loop.
#[derive(Clone, Default)]
pub struct WatchHealth(
    Arc<std::sync::Mutex<std::collections::BTreeMap<String, Option<Instant>>>>,
    Arc<std::sync::Mutex<Option<Instant>>>,
    /// Signalled by the probe when the API server answers again.
    backoff::ServerBack,
);

impl WatchHealth {
    fn queue(&self) {
        let mut p = match self.1.lock() {
            Ok(p) => p,
            Err(e) => e.into_inner(),
        };
        p.get_or_insert_with(Instant::now);
    }

    /// Since when the oldest change not yet taken by a sync has been waiting.
    pub fn pending_since(&self) -> Option<Instant> {
        match self.1.lock() {
            Ok(p) => *p,
            Err(e) => *e.into_inner(),
        }
    }

    /// A sync starts: every change queued so far is in the stores it reads.
    pub fn take_pending(&self) -> Option<Instant> {
        match self.1.lock() {
            Ok(mut p) => p.take(),
            Err(e) => e.into_inner().take(),
        }
    }

    /// The oldest of: a change waiting for a sync, a failing watch.
    pub fn stale_since(&self) -> Option<Instant> {
        [self.pending_since(), self.failing_since()]
            .into_iter()
            .flatten()
            .min()
    }

    fn set(&self, kind: &str, ok: bool) {
        let mut m = match self.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let e = m.entry(kind.to_owned()).or_insert(None);
        if ok {
            *e = None;
        } else if e.is_none() {
            *e = Some(Instant::now());
        }
    }

    fn failing(&self) -> Vec<String> {
        let m = match self.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Since when some watch has been failing (the earliest), if one is.
    pub fn failing_since(&self) -> Option<Instant> {
        let m = match self.0.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.values().flatten().min().copied()
    }
}

/// Start the three watches; `changed` is notified after every event.
pub fn start(client: Client, node_name: &str, changed: Arc<Notify>) -> Stores {
    let health = WatchHealth::default();
    let cache = Arc::new(std::sync::Mutex::new(Cache::default()));
    let c = cache.clone();
    spawn_reflector::<Service>(
        Api::all(client.clone()),
        watcher::Config::default().labels(WATCH_LABEL_SELECTOR),
        model::trim_service,
        move |ev| lock(&c).service_event(ev),
        changed.clone(),
        health.clone(),
    );
    let c = cache.clone();
    spawn_reflector::<SliceView>(
        Api::all(client.clone()),
        watcher::Config::default().labels(WATCH_LABEL_SELECTOR),
        model::trim_slice,
        move |ev| lock(&c).slice_event(ev),
        changed.clone(),
        health.clone(),
    );
    let client_probe = client.clone();
    let c = cache.clone();
    spawn_reflector::<Node>(
        Api::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        model::trim_node,
        move |ev| lock(&c).node_event(ev),
        changed,
        health.clone(),
    );
    spawn_probe(client_probe, node_name.to_owned(), health.clone());
    Stores {
        cache,
        watch_health: health,
    }
}

/// How often the failing kinds are probed. One one-item list every 500 ms
/// while the server is down is cheap for it (and answered from its watch
/// cache when it is up), and bounds how long watches sleep in their backoff
/// after the server is back: the change is then served well within 2 s.
pub const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// A probe that gets no answer within this counts as failed.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn lock(cache: &std::sync::Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    match cache.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    }
}

/// A watch that resumes after an outage says nothing until the next change,
/// and a watch waiting out its backoff does not try at all, so while a
/// kind's watch is failing, a one-item list of what it watches is tried
/// every [`PROBE_INTERVAL`] (one kind at a time while they all fail). When
/// it succeeds the API server is back for
/// that kind: `/healthz` recovers and every watch sleeping in its backoff
/// retries at once (see [`backoff`]).
fn spawn_probe(client: Client, node_name: String, health: WatchHealth) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round = 0usize;
        loop {
            tick.tick().await;
            // One request a tick while the server is down: a tick stops at
            // the first kind that fails, and starts from a different kind
            // each time (a kind failing for its own reasons does not hide
            // the others).
            let mut failing = health.failing();
            if !failing.is_empty() {
                round = round.wrapping_add(1);
                let start = round % failing.len();
                failing.rotate_left(start);
            }
            for kind in failing {
                let labels = ListParams::default().labels(WATCH_LABEL_SELECTOR).limit(1);
                let probe = async {
                    match kind.as_str() {
                        "Service" => Api::<Service>::all(client.clone())
                            .list(&labels)
                            .await
                            .is_ok(),
                        "EndpointSlice" => Api::<EndpointSlice>::all(client.clone())
                            .list(&labels)
                            .await
                            .is_ok(),
                        "Node" => Api::<Node>::all(client.clone())
                            .list(
                                &ListParams::default()
                                    .fields(&format!("metadata.name={node_name}"))
                                    .limit(1),
                            )
                            .await
                            .is_ok(),
                        _ => false,
                    }
                };
                let ok = tokio::time::timeout(PROBE_TIMEOUT, probe)
                    .await
                    .unwrap_or(false);
                if ok {
                    debug!(kind = %kind, "API server reachable again");
                    health.set(&kind, true);
                    health.2.signal();
                } else {
                    break;
                }
            }
        }
    });
}

impl Stores {
    /// Wait until every kind has completed its first list.
    pub async fn ready(&self) {
        while !lock(&self.cache).ready() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The Node, if known.
    pub fn node(&self) -> Option<Arc<Node>> {
        lock(&self.cache).node()
    }

    /// What changed since the last call, with the EndpointSlice trigger
    /// times it includes (None: nothing).
    pub fn take(&self) -> Option<(Batch, Vec<std::time::SystemTime>)> {
        lock(&self.cache).take_with_trigger_times()
    }

    /// Ask for a full rebuild at the next [`Stores::take`].
    pub fn request_full(&self) {
        lock(&self.cache).request_full();
    }

    /// The change tracker's counts (for `/metrics`).
    pub fn change_counts(&self) -> crate::changes::ChangeCounts {
        lock(&self.cache).change_counts()
    }
}

/// A watch whose events, each object as `trim` leaves it (what the model
/// reads: the agent holds every service and slice of the cluster), go to
/// `on_event` (the cache and its change tracker).
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    mut on_event: impl FnMut(watcher::Event<K>) + Send + 'static,
    changed: Arc<Notify>,
    health: WatchHealth,
) where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let kind = K::kind(&Default::default()).into_owned();
    // Our backoff, not kube's default: it is cut short when the probe sees
    // the API server answer again, and a 410 Gone relists at once.
    let stream = backoff::with_backoff(
        watcher(api, config),
        backoff::WatchBackoff::for_watch(&kind),
        health.2.subscribe(),
        kind.clone(),
    )
    .modify(trim);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(ev) => {
                    debug!(kind = %kind, event = ?event_name(&ev), "watch event");
                    on_event(ev);
                    health.set(&kind, true);
                    health.queue();
                    changed.notify_one();
                }
                // The watcher retries with backoff; the cache keeps serving
                // the last known state meanwhile.
                Err(e) => {
                    health.set(&kind, false);
                    warn!(kind = %kind, error = %e, "watch failed, retrying");
                }
            }
        }
    });
}

fn event_name<K>(ev: &watcher::Event<K>) -> &'static str {
    match ev {
        watcher::Event::Apply(_) => "apply",
        watcher::Event::Delete(_) => "delete",
        watcher::Event::Init => "init",
        watcher::Event::InitApply(_) => "init-apply",
        watcher::Event::InitDone => "init-done",
    }
}
