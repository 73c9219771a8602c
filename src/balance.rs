//! Choosing a replica: round-robin over the healthy ones (health is probed in
//! the background, never before a request), and retrying the same request on
//! another replica when one fails, within a time budget that outlasts a
//! failover.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::client::ClientError;

pub struct Member<C> {
    pub name: String,
    pub client: C,
    healthy: AtomicBool,
    /// Its `pygmy_pool_replica_healthy` series, looked up once.
    gauge: std::sync::OnceLock<metrics::Gauge>,
}

impl<C> Member<C> {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// The longest pause between rounds of tries. A failover ends while
/// callers are paused, so this is added to what clients see of it: at
/// 200 ms, `pygmy bench failover` measured ~0.5 s without a buy after the
/// primary was killed, with a new primary ready after ~0.28 s. The rounds
/// are cheap (a refused connection, or a replica answering "not primary").
const MAX_BACKOFF: Duration = Duration::from_millis(40);

/// How a pool picks the first replica to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Spread requests: the next healthy replica in turn.
    RoundRobin,
    /// Stick to the replica that answered last (the primary), follow redirects.
    Sticky,
}

pub struct Pool<C> {
    what: &'static str,
    members: Vec<Member<C>>,
    next: AtomicUsize,
    pick: Pick,
    budget: Duration,
}

impl<C: Clone + Send + Sync + 'static> Pool<C> {
    pub fn new(
        what: &'static str,
        members: Vec<(String, C)>,
        pick: Pick,
        budget: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            what,
            members: members
                .into_iter()
                .map(|(name, client)| Member {
                    name,
                    client,
                    healthy: AtomicBool::new(true),
                    gauge: std::sync::OnceLock::new(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            pick,
            budget,
        })
    }

    pub fn members(&self) -> &[Member<C>] {
        &self.members
    }

    /// The order to try the members in this time: healthy ones first.
    fn order(&self) -> Vec<usize> {
        let n = self.members.len();
        let start = match self.pick {
            Pick::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            Pick::Sticky => self.next.load(Ordering::Relaxed),
        } % n.max(1);
        let ring = (0..n).map(|k| (start + k) % n);
        let (mut up, down): (Vec<usize>, Vec<usize>) =
            ring.partition(|&i| self.members[i].is_healthy());
        up.extend(down);
        up
    }

    fn set_health(&self, i: usize, healthy: bool, why: &str) {
        let m = &self.members[i];
        m.gauge
            .get_or_init(|| crate::metrics::replica_health_gauge(self.what, &m.name))
            .set(if healthy { 1.0 } else { 0.0 });
        if m.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!(replica = %m.name, "{} {} is available again", self.what, m.name);
            } else {
                tracing::info!(replica = %m.name, "{} {} not available ({why})", self.what, m.name);
            }
        }
    }

    /// Calls `f` on one replica after another until one answers, an answer
    /// is final (not retryable), or the budget runs out.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.budget;
        let mut backoff = Duration::from_millis(5);
        let mut redirect: Option<usize> = None;
        // A replica that names the primary is followed at once, without a
        // pause (a failover ends with every replica naming the new primary);
        // but not twice in a row, so two replicas naming each other during
        // a view change cannot spin.
        let mut followed = false;
        loop {
            let mut last = None;
            let order = self.order();
            let mut tries = redirect.take().into_iter().chain(order).peekable();
            while let Some(i) = tries.next() {
                let m = &self.members[i];
                // No attempt outlives the budget: the caller's own deadline
                // (its request timeout) is set just beyond it.
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = match tokio::time::timeout(left, f(m.client.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(ClientError::Unreachable {
                        url: m.name.clone(),
                        detail: format!(
                            "no answer within the {} ms retry budget",
                            self.budget.as_millis()
                        ),
                    }),
                };
                match attempt {
                    Ok(v) => {
                        if self.pick == Pick::Sticky {
                            self.next.store(i, Ordering::Relaxed);
                        }
                        self.set_health(i, true, "");
                        return Ok(v);
                    }
                    Err(e) if !e.is_retryable() => return Err(e),
                    Err(e) => {
                        if let ClientError::Status {
                            primary: Some(p), ..
                        } = &e
                            && let Some(j) = self.members.iter().position(|m| &m.name == p)
                            && j != i
                        {
                            redirect = Some(j);
                        }
                        if matches!(e, ClientError::Unreachable { .. }) {
                            self.set_health(i, false, &e.to_string());
                        }
                        crate::metrics::retry(self.what);
                        let next = redirect.or_else(|| tries.peek().copied());
                        tracing::debug!(error = %e, "{} {} failed; next {:?}", self.what, m.name, next.map(|j| &self.members[j].name));
                        last = Some(e);
                        if Instant::now() >= deadline {
                            break;
                        }
                        if redirect.is_some() {
                            break;
                        }
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(last.unwrap_or_else(|| ClientError::Unreachable {
                    url: self.what.to_string(),
                    detail: "no replica configured".into(),
                }));
            }
            if redirect.is_some() && !followed {
                followed = true;
                continue;
            }
            followed = false;
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Probes every member every `interval` in the background.
    pub fn spawn_probe<F, Fut>(self: &Arc<Self>, interval: Duration, probe: F)
    where
        F: Fn(C) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                for i in 0..pool.members.len() {
                    let ok = probe(pool.members[i].client.clone()).await;
                    pool.set_health(i, ok, "health check failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(to: &str) -> ClientError {
        ClientError::Status {
            url: "test".into(),
            status: 421,
            message: "not the primary".into(),
            primary: Some(to.into()),
        }
    }

    /// On the runtime's paused clock a pause shows as time passed.
    #[tokio::test(start_paused = true)]
    async fn a_named_primary_is_tried_at_once_and_a_second_redirect_waits() {
        let pool = Pool::new(
            "catalog",
            vec![("a".to_string(), "a"), ("b".to_string(), "b")],
            Pick::Sticky,
            Duration::from_secs(8),
        );
        let started = tokio::time::Instant::now();
        let tried = std::sync::Mutex::new(Vec::new());
        let got = pool
            .call(|c| {
                tried.lock().unwrap().push(c);
                async move {
                    match c {
                        "a" => Err(redirect("b")),
                        _ => Ok(c),
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(got, "b");
        assert_eq!(*tried.lock().unwrap(), ["a", "b"]);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no pause before the primary"
        );

        // Two replicas naming each other: followed once at once, then paused.
        let tried = std::sync::Mutex::new(Vec::new());
        let err = pool
            .call(|c| {
                let mut t = tried.lock().unwrap();
                t.push(c);
                let n = t.len();
                async move {
                    match (c, n) {
                        (_, 1..=4) => Err(redirect(if c == "a" { "b" } else { "a" })),
                        _ => Ok(c),
                    }
                }
            })
            .await;
        assert!(err.is_ok());
        assert_eq!(tried.lock().unwrap().len(), 5);
        assert!(
            started.elapsed() >= Duration::from_millis(5),
            "a second redirect in a row pauses"
        );
    }
}
