//! Retry pacing for the watches.
//!
//! While the API server keeps failing, a watch retries after an exponential,
//! jittered and bounded delay, so a dead or struggling server is not
//! hammered. Two things cut that delay short:
//!
//! - the API server answers again: the probe (see `spawn_probe`) signals
//!   [`ServerBack`] and every sleeping watch retries at once, however long
//!   the outage lasted;
//! - the server says `410 Gone` (a restarted server whose watch cache starts
//!   over does, to a watch resuming from an older resourceVersion): the
//!   watcher has already dropped its resourceVersion, and relists at once.
//!
//! A success (an object listed or watched) resets the delay.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tokio::sync::watch;
use tracing::debug;

/// First delay after a failure.
pub const MIN_DELAY: Duration = Duration::from_millis(500);
/// The delay never grows beyond this.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Each delay is drawn from `[base * (1 - JITTER), base]`, so watches that
/// failed together do not retry in lockstep.
pub const JITTER: f64 = 0.25;

/// Exponential backoff (factor 2) between `min` and `max`, jittered
/// downwards, reset on success. The first `410 Gone` after a success is
/// retried without delay (it means "relist", not "the server is failing");
/// a second one in a row backs off like any failure.
///
/// A wait may be cut short when the server is seen answering, except after
/// a retry that such a signal triggered failed too: a server that answers
/// the probe but keeps failing the watch then gets the full delay once,
/// rather than a retry at every probe.
#[derive(Debug, Clone)]
pub struct WatchBackoff {
    min: Duration,
    max: Duration,
    /// Base of the next delay (before jitter).
    next: Duration,
    gone_retried: bool,
    /// The last wait was cut short by the server answering.
    woken_by_signal: bool,
    /// Whether the current wait may be cut short.
    cuttable: bool,
    rng: u64,
}

impl WatchBackoff {
    /// `seed` drives the jitter (any value; equal seeds, equal delays).
    pub fn new(min: Duration, max: Duration, seed: u64) -> WatchBackoff {
        let min = min.min(max);
        WatchBackoff {
            min,
            max,
            next: min,
            gone_retried: false,
            woken_by_signal: false,
            cuttable: true,
            rng: seed,
        }
    }

    /// The watches' policy: [`MIN_DELAY`] to [`MAX_DELAY`], seeded from the
    /// clock and the kind so that watches do not share a sequence.
    pub fn for_watch(kind: &str) -> WatchBackoff {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let kind_hash = kind.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        WatchBackoff::new(MIN_DELAY, MAX_DELAY, clock ^ kind_hash)
    }

    /// Something succeeded: the next failure starts over from `min`.
    pub fn succeeded(&mut self) {
        self.next = self.min;
        self.gone_retried = false;
        self.woken_by_signal = false;
        self.cuttable = true;
    }

    /// A wait ended: cut short by the server answering, or elapsed.
    pub fn woke(&mut self, by_signal: bool) {
        self.woken_by_signal = by_signal;
    }

    /// Whether the wait [`WatchBackoff::failed`] just returned may be cut
    /// short when the server is seen answering.
    pub fn signal_may_cut(&self) -> bool {
        self.cuttable
    }

    /// A failure: how long to wait before the next attempt. `gone` is a
    /// `410 Gone` answer.
    pub fn failed(&mut self, gone: bool) -> Duration {
        self.cuttable = gone || !self.woken_by_signal;
        if gone && !self.gone_retried {
            self.gone_retried = true;
            return Duration::ZERO;
        }
        let base = self.next;
        self.next = base.saturating_mul(2).min(self.max);
        let fraction = (splitmix64(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - JITTER * fraction)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// "The API server answers again": a generation counter bumped by the probe;
/// watches sleeping in their backoff wake up when it changes.
#[derive(Clone, Debug)]
pub struct ServerBack(std::sync::Arc<watch::Sender<u64>>);

impl Default for ServerBack {
    fn default() -> Self {
        ServerBack(std::sync::Arc::new(watch::Sender::new(0)))
    }
}

impl ServerBack {
    /// Wake every watch waiting out a backoff (and the next one to start
    /// waiting, if one is between attempts).
    pub fn signal(&self) {
        self.0.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The full delay elapsed.
    Elapsed,
    /// Cut short: the server was seen answering since the last attempt
    /// started (see [`mark_attempt`]).
    ServerBack,
}

/// Wait `delay`, or less if the server is seen answering meanwhile or was
/// seen since the last [`mark_attempt`].
pub async fn sleep_unless_back(delay: Duration, back: &mut watch::Receiver<u64>) -> Woken {
    if delay.is_zero() {
        return Woken::Elapsed;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => Woken::Elapsed,
        changed = back.changed() => match changed {
            Ok(()) => Woken::ServerBack,
            // No sender left (the agent is shutting down): plain sleep.
            Err(_) => {
                tokio::time::sleep(delay).await;
                Woken::Elapsed
            }
        },
    }
}

/// An attempt starts: signals from now on cut the next wait short, older
/// ones no longer do.
pub fn mark_attempt(back: &mut watch::Receiver<u64>) {
    back.borrow_and_update();
}

/// What a watcher item says about the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Objects listed or watched: the server answers.
    Success,
    /// A marker the watcher emits on its own (`Init` before a list): says
    /// nothing about the server.
    Marker,
    /// `410 Gone`: the resourceVersion is too old; the watcher relists.
    Gone,
    /// Any other failure.
    Failed,
}

pub fn classify<K>(item: &Result<watcher::Event<K>, watcher::Error>) -> Outcome {
    match item {
        Ok(watcher::Event::Init) => Outcome::Marker,
        Ok(_) => Outcome::Success,
        Err(watcher::Error::WatchError(status)) if status.code == 410 => Outcome::Gone,
        Err(
            watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status))
            | watcher::Error::WatchFailed(kube::Error::Api(status)),
        ) if status.code == 410 => Outcome::Gone,
        Err(_) => Outcome::Failed,
    }
}

/// `stream` (a kube watcher, which retries on every poll after an error)
/// paced by `backoff`: after an error it is polled again only once the
/// delay has elapsed or the server is seen answering.
pub fn with_backoff<K, S>(
    stream: S,
    backoff: WatchBackoff,
    back: watch::Receiver<u64>,
    kind: String,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    struct Paced<S> {
        stream: std::pin::Pin<Box<S>>,
        backoff: WatchBackoff,
        back: watch::Receiver<u64>,
        wait: Duration,
        kind: String,
    }
    let state = Paced {
        stream: Box::pin(stream),
        backoff,
        back,
        wait: Duration::ZERO,
        kind,
    };
    futures::stream::unfold(state, |mut s| async move {
        if !s.wait.is_zero() {
            let woken = if s.backoff.signal_may_cut() {
                sleep_unless_back(s.wait, &mut s.back).await
            } else {
                tokio::time::sleep(s.wait).await;
                Woken::Elapsed
            };
            if woken == Woken::ServerBack {
                debug!(kind = %s.kind, "API server answers again, retrying the watch now");
            }
            s.backoff.woke(woken == Woken::ServerBack);
            s.wait = Duration::ZERO;
        }
        mark_attempt(&mut s.back);
        let item = s.stream.next().await?;
        match classify(&item) {
            Outcome::Success => s.backoff.succeeded(),
            Outcome::Marker => {}
            Outcome::Gone => {
                s.wait = s.backoff.failed(true);
                debug!(kind = %s.kind, delay = ?s.wait, "resourceVersion gone, relisting");
            }
            Outcome::Failed => {
                s.wait = s.backoff.failed(false);
                debug!(kind = %s.kind, delay = ?s.wait, "watch failed, backing off");
            }
        }
        Some((item, s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::core::Status;

    fn backoff() -> WatchBackoff {
        WatchBackoff::new(Duration::from_millis(500), Duration::from_secs(30), 7)
    }

    #[test]
    fn grows_while_failing_and_stays_bounded() {
        let mut b = backoff();
        let delays: Vec<Duration> = (0..20).map(|_| b.failed(false)).collect();
        let mut base = Duration::from_millis(500);
        for (i, d) in delays.iter().enumerate() {
            assert!(
                *d <= base && *d >= base.mul_f64(1.0 - JITTER),
                "delay {i} = {d:?}, base {base:?}"
            );
            base = (base * 2).min(Duration::from_secs(30));
        }
        // Growth: the 4th delay is at least 4 s * 0.75 (the 1st at most 0.5 s).
        assert!(delays[3] >= Duration::from_secs(3), "{delays:?}");
        // Bounded: from the 7th on the base is the maximum.
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(delays[19] >= Duration::from_secs(30).mul_f64(1.0 - JITTER));
        // Jittered: not all delays at the cap are equal.
        let capped: std::collections::BTreeSet<_> = delays[7..].iter().collect();
        assert!(capped.len() > 1, "no jitter: {delays:?}");
    }

    #[test]
    fn success_resets() {
        let mut b = backoff();
        for _ in 0..10 {
            b.failed(false);
        }
        assert!(b.failed(false) >= Duration::from_secs(20));
        b.succeeded();
        assert!(b.failed(false) <= Duration::from_millis(500));
    }

    #[test]
    fn first_gone_is_immediate_repeated_gone_backs_off() {
        let mut b = backoff();
        for _ in 0..5 {
            b.failed(false);
        }
        assert_eq!(b.failed(true), Duration::ZERO, "410 relists at once");
        // Without a success in between, a second 410 is a failing server.
        assert!(b.failed(true) >= Duration::from_secs(10));
        b.succeeded();
        assert_eq!(b.failed(true), Duration::ZERO);
    }

    #[test]
    fn failure_after_a_signalled_retry_waits_in_full() {
        let mut b = backoff();
        b.failed(false);
        assert!(b.signal_may_cut());
        b.woke(true); // the server answered the probe
        b.failed(false); // but the retry failed again
        assert!(!b.signal_may_cut(), "a signal would retry at every probe");
        b.woke(false); // that wait elapsed
        b.failed(false);
        assert!(b.signal_may_cut());
        // A 410 after a signalled retry is a relist, not a failing server.
        b.woke(true);
        b.failed(true);
        assert!(b.signal_may_cut());
        b.succeeded();
        b.failed(false);
        assert!(b.signal_may_cut());
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    /// Guards the tests below against hanging: a wait that is not cut short
    /// lasts a minute.
    const GUARD: Duration = Duration::from_secs(5);

    #[test]
    fn sleep_is_cut_short_when_the_server_answers() {
        runtime().block_on(async {
            let back = ServerBack::default();
            let mut rx = back.subscribe();
            mark_attempt(&mut rx);
            let signaller = back.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                signaller.signal();
            });
            let woken =
                tokio::time::timeout(GUARD, sleep_unless_back(Duration::from_secs(60), &mut rx))
                    .await
                    .expect("the signal cut the 60 s wait short");
            assert_eq!(woken, Woken::ServerBack);
        });
    }

    #[test]
    fn signal_during_the_attempt_cuts_the_following_wait() {
        runtime().block_on(async {
            let back = ServerBack::default();
            let mut rx = back.subscribe();
            back.signal(); // before the attempt: stale
            mark_attempt(&mut rx);
            // A stale signal does not cut the wait.
            let stale = tokio::time::timeout(
                Duration::from_millis(50),
                sleep_unless_back(Duration::from_secs(60), &mut rx),
            )
            .await;
            assert!(
                stale.is_err(),
                "a signal older than the attempt cut the wait"
            );
            back.signal(); // during the attempt
            let woken =
                tokio::time::timeout(GUARD, sleep_unless_back(Duration::from_secs(60), &mut rx))
                    .await
                    .expect("cut short");
            assert_eq!(woken, Woken::ServerBack);
        });
    }

    fn cm(name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c
    }

    fn gone() -> watcher::Error {
        watcher::Error::WatchError(
            Status::failure("too old resource version", "Expired")
                .with_code(410)
                .boxed(),
        )
    }

    fn unavailable() -> watcher::Error {
        watcher::Error::WatchStartFailed(kube::Error::Api(
            Status::failure("unavailable", "ServiceUnavailable")
                .with_code(503)
                .boxed(),
        ))
    }

    fn slow() -> WatchBackoff {
        WatchBackoff::new(Duration::from_secs(60), Duration::from_secs(60), 1)
    }

    #[test]
    fn classify_items() {
        assert_eq!(
            classify::<ConfigMap>(&Ok(watcher::Event::Init)),
            Outcome::Marker
        );
        assert_eq!(
            classify(&Ok(watcher::Event::InitApply(cm("a")))),
            Outcome::Success
        );
        assert_eq!(
            classify::<ConfigMap>(&Ok(watcher::Event::InitDone)),
            Outcome::Success
        );
        assert_eq!(classify::<ConfigMap>(&Err(gone())), Outcome::Gone);
        assert_eq!(classify::<ConfigMap>(&Err(unavailable())), Outcome::Failed);
    }

    #[test]
    fn stream_relists_at_once_after_gone() {
        runtime().block_on(async {
            let back = ServerBack::default();
            let items = vec![
                Ok(watcher::Event::Apply(cm("a"))),
                Err(gone()),
                Ok(watcher::Event::Init),
                Ok(watcher::Event::InitApply(cm("a"))),
            ];
            let paced = with_backoff(
                futures::stream::iter(items),
                slow(),
                back.subscribe(),
                "ConfigMap".into(),
            );
            let got = tokio::time::timeout(GUARD, paced.collect::<Vec<_>>())
                .await
                .expect("no 60 s wait after a 410");
            assert_eq!(got.len(), 4);
        });
    }

    #[test]
    fn stream_waits_after_a_failure_until_the_server_answers() {
        runtime().block_on(async {
            let back = ServerBack::default();
            let items = vec![Err(unavailable()), Ok(watcher::Event::Apply(cm("b")))];
            let mut paced = Box::pin(with_backoff(
                futures::stream::iter(items),
                slow(),
                back.subscribe(),
                "ConfigMap".into(),
            ));
            let first = paced.next().await.expect("first item");
            assert!(first.is_err());
            // The retry waits out the backoff ...
            let early = tokio::time::timeout(Duration::from_millis(50), paced.next()).await;
            assert!(early.is_err(), "retried without waiting");
            // ... until the server is seen answering.
            back.signal();
            let next = tokio::time::timeout(GUARD, paced.next())
                .await
                .expect("the signal ended the wait")
                .expect("an item");
            assert!(matches!(next, Ok(watcher::Event::Apply(_))));
        });
    }

    #[test]
    fn stream_does_not_retry_at_every_signal_while_failing() {
        runtime().block_on(async {
            let back = ServerBack::default();
            let items = vec![
                Err(unavailable()),
                Err(unavailable()),
                Ok(watcher::Event::Apply(cm("c"))),
            ];
            let mut paced = Box::pin(with_backoff(
                futures::stream::iter(items),
                slow(),
                back.subscribe(),
                "ConfigMap".into(),
            ));
            assert!(paced.next().await.expect("first").is_err());
            back.signal();
            let second = tokio::time::timeout(GUARD, paced.next())
                .await
                .expect("the signal ended the first wait")
                .expect("an item");
            assert!(second.is_err());
            // The signalled retry failed: further signals do not cut the
            // next wait.
            back.signal();
            let early = tokio::time::timeout(Duration::from_millis(50), paced.next()).await;
            assert!(
                early.is_err(),
                "retried at a signal after a signalled retry failed"
            );
        });
    }
}
