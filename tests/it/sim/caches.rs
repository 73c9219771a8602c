//! Frontend caches in the simulator: the shipped cache (`frontend::cache`)
//! at each frontend, the shipped per-frontend link state
//! (`catalog::invalidation::LinkState`) at the primary, and between them
//! the protocol of `docs/DESIGN-NOTES.md` ("Linearizable reads"): a write's
//! *begin* is queued for every cache and the write proposed *held*, and it
//! is released (may commit) once the begin reached every cache holding a
//! lease; its *end* reaches them before its client is answered; a new primary fences every cache
//! before it becomes ready; frontends renew their leases every quarter
//! lease, counting them from when they asked, on their own clocks. Pushes
//! are one batch at a time per frontend, delivered before the lease the
//! primary granted surely ran out, or waited out.
//!
//! Every read served from a cache is checked: no write to its book that a
//! client already saw (acknowledged, or read) may be newer than the cached
//! value.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pygmy::api::{InvalidationBatch, LeaseGrant, LookupResponse, Money, Version as ApiVersion};
use pygmy::catalog::invalidation::LinkState;
use pygmy::frontend::cache::{Cache, Ticket};
use pygmy::replication::{ProposeError, ReadGate, Role, Version};

use super::{Command, Ev, R, Reply, Sim, book_id, to_api, to_core};

/// How often an unanswered push is sent again (the HTTP client's retries).
const RESEND_MS: u64 = 60;

/// One frontend: its cache and its clock.
pub(super) struct Frontend {
    cache: Cache,
    clock_off: u64,
    rate: f64,
    /// The catalog replica it asks for leases (learnt from refusals).
    primary_hint: usize,
    /// The last lease request was answered.
    answered: bool,
    /// Process lives: what was sent to an earlier one is lost.
    life: u64,
}

impl Frontend {
    fn local(&self, t: u64) -> u64 {
        self.clock_off + (t as f64 * self.rate) as u64
    }
}

/// Who waits for a push to finish.
#[derive(Clone, Copy, Debug)]
pub(super) enum Waiter {
    Fence,
    Op(u64),
}

#[derive(Debug)]
struct InFlight {
    token: u64,
    waiters: Vec<Waiter>,
    /// The push timed out: late acknowledgements are ignored.
    failed: bool,
}

struct Link {
    st: LinkState,
    queue: Vec<(Option<pygmy::api::Invalidation>, Waiter)>,
    in_flight: Option<InFlight>,
}

/// A primary's invalidator for one epoch.
pub(super) struct Invalidator {
    epoch: u64,
    links: Vec<Link>,
    fence_waiting: usize,
}

#[derive(Debug)]
enum Phase {
    /// Proposed held at this version: released once its begin is delivered.
    Held(Version),
    /// Released (or not proposed: refused, answered from before).
    Proposed,
    End(Reply),
}

/// A client's write at the primary, between its begin and its answer.
#[derive(Debug)]
pub(super) struct Op {
    client: usize,
    rid: String,
    book: usize,
    phase: Phase,
    waiting: usize,
}

/// Per-node cache state at the primary (dropped by a crash).
#[derive(Default)]
pub(super) struct PrimarySide {
    inv: Option<Invalidator>,
    ops: BTreeMap<u64, Op>,
}

impl PrimarySide {
    pub(super) fn describe(&self) -> String {
        match &self.inv {
            None => String::new(),
            Some(inv) => format!(
                " caches: epoch {} fence_waiting {} ops {:?} links {:?}",
                inv.epoch,
                inv.fence_waiting,
                self.ops,
                inv.links
                    .iter()
                    .map(|l| (l.queue.len(), &l.in_flight))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// Cache events.
#[derive(Debug)]
pub(super) enum CacheEv {
    Batch {
        f: usize,
        fe_life: u64,
        node: usize,
        life: u64,
        token: u64,
        batch: InvalidationBatch,
    },
    BatchAck {
        node: usize,
        life: u64,
        f: usize,
        token: u64,
    },
    PushExpired {
        node: usize,
        life: u64,
        f: usize,
        token: u64,
        expiry_local: u64,
    },
    PushWaited {
        node: usize,
        life: u64,
        f: usize,
        token: u64,
    },
    Kick {
        node: usize,
        life: u64,
        f: usize,
    },
    /// The push's call retries until it is answered or the lease ran out.
    Resend {
        node: usize,
        life: u64,
        f: usize,
        token: u64,
        batch: InvalidationBatch,
    },
    OpReady {
        node: usize,
        life: u64,
        op: u64,
    },
    Renew {
        f: usize,
    },
    LeaseAsk {
        node: usize,
        f: usize,
        fe_life: u64,
        sent_at: u64,
    },
    LeaseAnswer {
        f: usize,
        fe_life: u64,
        sent_at: u64,
        grant: Option<Box<LeaseGrant>>,
        hint: Option<usize>,
    },
    Read {
        client: usize,
    },
    Fetch {
        f: usize,
        fe_life: u64,
        node: usize,
        book: usize,
        ticket: Ticket,
    },
    Fill {
        f: usize,
        fe_life: u64,
        ticket: Ticket,
        value: Arc<LookupResponse>,
    },
}

impl CacheEv {
    /// The catalog node the event happens at, if any (paused nodes wait).
    pub(super) fn node(&self) -> Option<usize> {
        match self {
            CacheEv::BatchAck { node, .. }
            | CacheEv::PushExpired { node, .. }
            | CacheEv::PushWaited { node, .. }
            | CacheEv::Kick { node, .. }
            | CacheEv::Resend { node, .. }
            | CacheEv::OpReady { node, .. }
            | CacheEv::LeaseAsk { node, .. }
            | CacheEv::Fetch { node, .. } => Some(*node),
            _ => None,
        }
    }

    /// The frontend the event's message goes to or comes from.
    fn frontend(&self) -> Option<usize> {
        match self {
            CacheEv::Batch { f, .. }
            | CacheEv::BatchAck { f, .. }
            | CacheEv::LeaseAsk { f, .. }
            | CacheEv::LeaseAnswer { f, .. }
            | CacheEv::Fetch { f, .. }
            | CacheEv::Fill { f, .. } => Some(*f),
            _ => None,
        }
    }
}

/// Cache settings of a schedule.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub frontends: usize,
    pub lease_ms: u64,
    /// Override of the drift margin the primary allows cache leases
    /// (`None`: the core's).
    pub drift_margin: Option<f64>,
    pub read_every_ms: u64,
    /// Answer a write as its end is queued for the caches, without waiting
    /// for it to arrive (unsafe: for the teeth test).
    pub answer_before_end: bool,
}

impl CacheOptions {
    pub fn new(frontends: usize) -> Self {
        CacheOptions {
            frontends,
            lease_ms: 1000,
            drift_margin: None,
            read_every_ms: 4,
            answer_before_end: false,
        }
    }
}

impl Sim {
    pub(super) fn new_frontends(&mut self) {
        let Some(co) = self.opts.caches.clone() else {
            return;
        };
        let lease = self.opts.timing.map_or(500, |t| t.0);
        for _ in 0..co.frontends {
            let rate = 0.953 + self.rng.below(96) as f64 / 1000.0;
            let off = self.rng.below(1_000_000);
            let fence = Duration::from_millis((lease as f64 * 1.1) as u64);
            self.frontends.push(Frontend {
                cache: Cache::new(true, 1000).with_fence_timeout(fence),
                clock_off: off,
                rate,
                primary_hint: self.rng.below(self.nodes.len() as u64) as usize,
                answered: true,
                life: 0,
            });
        }
        self.fe_cut = vec![false; co.frontends];
        for f in 0..co.frontends {
            let d = self.rng.below(co.lease_ms / 4);
            self.at(d, Ev::Cache(CacheEv::Renew { f }));
        }
        for client in 0..self.clients.len() {
            let d = self.rng.below(20);
            self.at(d, Ev::Cache(CacheEv::Read { client }));
        }
    }

    /// A frontend restarted: an empty cache without a lease.
    pub(super) fn restart_frontend(&mut self, f: usize) {
        let lease = self.opts.timing.map_or(500, |t| t.0);
        let fence = Duration::from_millis((lease as f64 * 1.1) as u64);
        self.frontends[f].cache = Cache::new(true, 1000).with_fence_timeout(fence);
        self.frontends[f].life += 1;
        self.stats.frontends_restarted += 1;
    }

    fn instant(&self, local_ms: u64) -> Instant {
        self.base + Duration::from_millis(local_ms)
    }

    /// Simulated time at which node `i`'s clock shows `local`.
    fn when_node_shows(&self, i: usize, local: u64) -> u64 {
        let n = &self.nodes[i];
        let since = local.saturating_sub(n.clock_off) as f64 / n.rate;
        (n.boot_t + since.ceil() as u64).max(self.t)
    }

    fn cache_lease(&self) -> (Duration, Duration) {
        let co = self.opts.caches.as_ref().expect("caches modelled");
        let drift = co.drift_margin.unwrap_or(0.1);
        let lease = Duration::from_millis(co.lease_ms);
        (lease, lease.mul_f64(1.0 + drift))
    }

    /// After the driver ran at node `i`: a new primary gets an invalidator
    /// for its epoch and fences every cache; a former one drops it.
    pub(super) fn cache_upkeep(&mut self, i: usize) {
        if self.opts.caches.is_none() {
            return;
        }
        let Some(r) = self.nodes[i].r.as_ref() else {
            return;
        };
        let (role, epoch) = (r.role(), r.epoch());
        let side = &mut self.nodes[i].side;
        if role != Role::Primary {
            side.inv = None;
            side.ops.clear();
            return;
        }
        if side.inv.as_ref().is_some_and(|v| v.epoch == epoch) {
            return;
        }
        side.ops.clear();
        let (lease, _) = self.cache_lease();
        let drift = self
            .opts
            .caches
            .as_ref()
            .unwrap()
            .drift_margin
            .unwrap_or(0.1);
        let repl_lease = Duration::from_millis(self.opts.timing.map_or(500, |t| t.0));
        let assumed = (lease + repl_lease).mul_f64(1.0 + drift);
        let now = self.instant(self.nodes[i].local(self.t));
        let links = (0..self.frontends.len())
            .map(|_| Link {
                st: LinkState::new(now, assumed),
                queue: Vec::new(),
                in_flight: None,
            })
            .collect();
        self.nodes[i].side.inv = Some(Invalidator {
            epoch,
            links,
            fence_waiting: 0,
        });
        self.push(i, None, Waiter::Fence);
    }

    /// Queues `item` for every frontend; `waiter` is told once each is done.
    fn push(&mut self, i: usize, item: Option<pygmy::api::Invalidation>, waiter: Waiter) {
        let n = self.frontends.len();
        let life = self.nodes[i].life;
        let side = &mut self.nodes[i].side;
        let Some(inv) = side.inv.as_mut() else {
            return;
        };
        for l in &mut inv.links {
            l.queue.push((item, waiter));
        }
        match waiter {
            Waiter::Fence => inv.fence_waiting += n,
            Waiter::Op(id) => {
                if let Some(op) = side.ops.get_mut(&id) {
                    op.waiting += n;
                }
            }
        }
        for f in 0..n {
            self.at(0, Ev::Cache(CacheEv::Kick { node: i, life, f }));
        }
    }

    fn kick(&mut self, i: usize, f: usize) -> R<()> {
        let now_local = self.nodes[i].local(self.t);
        let now = self.instant(now_local);
        let life = self.nodes[i].life;
        let Some(inv) = self.nodes[i].side.inv.as_mut() else {
            return Ok(());
        };
        let epoch = inv.epoch;
        let link = &mut inv.links[f];
        if link.in_flight.is_some() || link.queue.is_empty() {
            return Ok(());
        }
        let batch: Vec<_> = std::mem::take(&mut link.queue);
        let items: Vec<_> = batch.iter().filter_map(|(it, _)| *it).collect();
        let waiters: Vec<Waiter> = batch.iter().map(|(_, w)| *w).collect();
        let Some((seq, expiry)) = link.st.start_batch(&items, now) else {
            // No lease out: this frontend serves nothing cached.
            return self.done(i, waiters);
        };
        let token = self.token + 1;
        link.in_flight = Some(InFlight {
            token,
            waiters,
            failed: false,
        });
        self.token = token;
        let expiry_local = expiry.duration_since(self.base).as_millis() as u64;
        let at = self.when_node_shows(i, expiry_local);
        self.at(
            at - self.t,
            Ev::Cache(CacheEv::PushExpired {
                node: i,
                life,
                f,
                token,
                expiry_local,
            }),
        );
        let batch = InvalidationBatch { epoch, seq, items };
        self.send_batch(i, f, token, batch);
        Ok(())
    }

    fn send_batch(&mut self, i: usize, f: usize, token: u64, batch: InvalidationBatch) {
        let life = self.nodes[i].life;
        self.at(
            RESEND_MS,
            Ev::Cache(CacheEv::Resend {
                node: i,
                life,
                f,
                token,
                batch: batch.clone(),
            }),
        );
        let fe_life = self.frontends[f].life;
        self.fe_send(CacheEv::Batch {
            f,
            fe_life,
            node: i,
            life,
            token,
            batch,
        });
    }

    /// A message between a frontend and a catalog node: lost or delayed
    /// like any other.
    fn fe_send(&mut self, ev: CacheEv) {
        let cut = ev.frontend().is_some_and(|f| self.fe_cut[f]);
        if cut || self.rng.chance(self.loss) {
            return;
        }
        let d = self.delay();
        self.at(d, Ev::Cache(ev));
    }

    fn done(&mut self, i: usize, waiters: Vec<Waiter>) -> R<()> {
        let life = self.nodes[i].life;
        let mut fenced = false;
        let mut ready = Vec::new();
        {
            let node = &mut self.nodes[i];
            for w in waiters {
                match w {
                    Waiter::Fence => {
                        if let Some(inv) = node.side.inv.as_mut() {
                            inv.fence_waiting -= 1;
                            if inv.fence_waiting == 0 {
                                if let Some(r) = node.r.as_mut() {
                                    r.caches_fenced(inv.epoch);
                                }
                                fenced = true;
                            }
                        }
                    }
                    Waiter::Op(id) => {
                        if let Some(op) = node.side.ops.get_mut(&id) {
                            op.waiting -= 1;
                            if op.waiting == 0 {
                                ready.push(id);
                            }
                        }
                    }
                }
            }
        }
        for op in ready {
            self.at(0, Ev::Cache(CacheEv::OpReady { node: i, life, op }));
        }
        if fenced {
            self.process(i)?;
        }
        Ok(())
    }

    /// A client's write at a catalog node, with caches: at the primary its
    /// begin is queued for every cache, and it is proposed held until the
    /// begin was delivered.
    pub(super) fn request_with_caches(
        &mut self,
        client: usize,
        i: usize,
        rid: String,
        book: usize,
    ) -> R<bool> {
        let node = &self.nodes[i];
        let Some(r) = node.r.as_ref() else {
            return Ok(true);
        };
        if r.role() != Role::Primary {
            return Ok(false); // redirected by the plain path
        }
        let epoch = r.epoch();
        if node.side.inv.as_ref().is_none_or(|v| v.epoch != epoch) {
            self.answer(client, Reply::Retry { rid });
            return Ok(true);
        }
        self.op_id += 1;
        let id = self.op_id;
        self.nodes[i].side.ops.insert(
            id,
            Op {
                client,
                rid: rid.clone(),
                book,
                phase: Phase::Proposed,
                waiting: 0,
            },
        );
        let begin = pygmy::api::Invalidation {
            book_id: book_id(book),
            version: ApiVersion::default(),
            begin: true,
        };
        self.push(i, Some(begin), Waiter::Op(id));
        self.propose_held(client, i, id, rid, book)?;
        Ok(true)
    }

    /// The write of op `id`, its begin queued: answered from before, or
    /// proposed held, or refused.
    fn propose_held(
        &mut self,
        client: usize,
        i: usize,
        id: u64,
        rid: String,
        book: usize,
    ) -> R<()> {
        let now = self.nodes[i].local(self.t);
        let node = &mut self.nodes[i];
        let r = node.r.as_mut().unwrap();
        if let Some((ok, version)) = node.store.answer(&rid)
            && r.is_primary_ready()
        {
            // A retry of a write already applied: its first answer.
            self.end_op(i, id, Reply::Ack { rid, ok, version });
            return Ok(());
        }
        let cmd = Command::Buy {
            book_id: book_id(book),
        }
        .encode();
        let refused = match r.propose_held(now, rid.clone(), cmd) {
            Ok(v) => {
                node.pending.insert(v.seq, (client, rid.clone()));
                node.side.ops.get_mut(&id).unwrap().phase = Phase::Held(v);
                None
            }
            Err(ProposeError::NotPrimary { primary: Some(p) }) => Some(Reply::Redirect {
                rid: rid.clone(),
                to: (p - 1) as usize,
            }),
            Err(e) => {
                if std::env::var_os("PYGMY_SIM_TRACE").is_some() {
                    eprintln!("[{:>5}] propose refused at node {}: {e:?}", self.t, i + 1);
                }
                Some(Reply::Retry { rid: rid.clone() })
            }
        };
        match refused {
            None => self.process(i),
            Some(reply) => {
                // Refused: its end goes out (nobody waits for it), and the
                // client tries again.
                self.nodes[i].side.ops.get_mut(&id).unwrap().rid = String::new();
                self.end_op(i, id, Reply::Retry { rid });
                self.answer(client, reply);
                Ok(())
            }
        }
    }

    /// Answers of node `i`'s driver: with caches, a write is answered only
    /// once its end reached every cache.
    pub(super) fn answers_with_caches(&mut self, i: usize, answers: Vec<(usize, Reply)>) {
        for (client, reply) in answers {
            let op = match &reply {
                Reply::Ack { rid, .. } => self.nodes[i]
                    .side
                    .ops
                    .iter()
                    .find(|(_, o)| {
                        o.rid == *rid && matches!(o.phase, Phase::Proposed | Phase::Held(_))
                    })
                    .map(|(id, _)| *id),
                _ => None,
            };
            match op {
                Some(id) => self.end_op(i, id, reply),
                None => self.answer(client, reply),
            }
        }
    }

    fn end_op(&mut self, i: usize, id: u64, reply: Reply) {
        let version = match &reply {
            Reply::Ack { version, .. } => to_api(*version),
            _ => to_api(self.nodes[i].store.last),
        };
        let early = self
            .opts
            .caches
            .as_ref()
            .is_some_and(|c| c.answer_before_end);
        let Some(op) = self.nodes[i].side.ops.get_mut(&id) else {
            return;
        };
        let answer = (early && !op.rid.is_empty()).then(|| (op.client, reply.clone()));
        if answer.is_some() {
            op.rid = String::new();
        }
        op.phase = Phase::End(reply);
        let end = pygmy::api::Invalidation {
            book_id: book_id(op.book),
            version,
            begin: false,
        };
        self.push(i, Some(end), Waiter::Op(id));
        if let Some((client, reply)) = answer {
            self.answer(client, reply);
        }
    }

    fn op_ready(&mut self, i: usize, id: u64) -> R<()> {
        let Some(op) = self.nodes[i].side.ops.get(&id) else {
            return Ok(());
        };
        match op.phase {
            Phase::Proposed => Ok(()),
            Phase::End(_) => {
                let op = self.nodes[i].side.ops.remove(&id).unwrap();
                if let Phase::End(reply) = op.phase
                    && !op.rid.is_empty()
                {
                    self.answer(op.client, reply);
                }
                Ok(())
            }
            Phase::Held(v) => {
                // The begin reached every cache: the write may commit.
                self.nodes[i].side.ops.get_mut(&id).unwrap().phase = Phase::Proposed;
                if let Some(r) = self.nodes[i].r.as_mut() {
                    r.release(v);
                }
                self.process(i)
            }
        }
    }

    pub(super) fn on_cache_event(&mut self, ev: CacheEv) -> R<()> {
        if let Some(i) = ev.node() {
            if self.nodes[i].paused_until > self.t {
                let wake = self.nodes[i].paused_until - self.t;
                self.at(wake, Ev::Cache(ev));
                return Ok(());
            }
            if !self.nodes[i].up {
                return Ok(());
            }
        }
        if std::env::var_os("PYGMY_SIM_TRACE").is_some() && !matches!(ev, CacheEv::Read { .. }) {
            let text = format!("{ev:?}");
            eprintln!("[{:>5}] cache {}", self.t, &text[..text.len().min(3000)]);
        }
        let alive =
            |s: &Sim, node: usize, life: u64| s.nodes[node].up && s.nodes[node].life == life;
        match ev {
            CacheEv::Batch {
                f,
                fe_life,
                node,
                life,
                token,
                batch,
            } => {
                if fe_life != self.frontends[f].life {
                    return Ok(()); // sent to a process that is gone
                }
                let now = self.instant(self.frontends[f].local(self.t));
                self.frontends[f].cache.invalidate_at(&batch, now);
                self.fe_send(CacheEv::BatchAck {
                    node,
                    life,
                    f,
                    token,
                });
            }
            CacheEv::BatchAck {
                node,
                life,
                f,
                token,
            } => {
                if !alive(self, node, life) {
                    return Ok(());
                }
                let Some(inv) = self.nodes[node].side.inv.as_mut() else {
                    return Ok(());
                };
                let link = &mut inv.links[f];
                if link
                    .in_flight
                    .as_ref()
                    .is_some_and(|x| x.token == token && !x.failed)
                {
                    let x = link.in_flight.take().unwrap();
                    self.at(0, Ev::Cache(CacheEv::Kick { node, life, f }));
                    self.done(node, x.waiters)?;
                }
            }
            CacheEv::PushExpired {
                node,
                life,
                f,
                token,
                expiry_local,
            } => {
                if !alive(self, node, life) {
                    return Ok(());
                }
                let expiry = self.instant(expiry_local);
                let Some(inv) = self.nodes[node].side.inv.as_mut() else {
                    return Ok(());
                };
                let link = &mut inv.links[f];
                let until = match link.in_flight.as_mut().filter(|x| x.token == token) {
                    Some(x) => {
                        x.failed = true;
                        Some(link.st.push_failed(expiry))
                    }
                    None => None,
                };
                if let Some(until) = until {
                    let until_local = until.duration_since(self.base).as_millis() as u64;
                    let at = self.when_node_shows(node, until_local);
                    self.at(
                        at - self.t,
                        Ev::Cache(CacheEv::PushWaited {
                            node,
                            life,
                            f,
                            token,
                        }),
                    );
                }
            }
            CacheEv::PushWaited {
                node,
                life,
                f,
                token,
            } => {
                if !alive(self, node, life) {
                    return Ok(());
                }
                let Some(inv) = self.nodes[node].side.inv.as_mut() else {
                    return Ok(());
                };
                let link = &mut inv.links[f];
                if link.in_flight.as_ref().is_some_and(|x| x.token == token) {
                    let x = link.in_flight.take().unwrap();
                    self.at(0, Ev::Cache(CacheEv::Kick { node, life, f }));
                    self.done(node, x.waiters)?;
                }
            }
            CacheEv::Resend {
                node,
                life,
                f,
                token,
                batch,
            } => {
                let live = alive(self, node, life)
                    && self.nodes[node].side.inv.as_ref().is_some_and(|inv| {
                        inv.links[f]
                            .in_flight
                            .as_ref()
                            .is_some_and(|x| x.token == token && !x.failed)
                    });
                if live {
                    self.send_batch(node, f, token, batch);
                }
            }
            CacheEv::Kick { node, life, f } => {
                if alive(self, node, life) {
                    self.kick(node, f)?;
                }
            }
            CacheEv::OpReady { node, life, op } => {
                if alive(self, node, life) {
                    self.op_ready(node, op)?;
                }
            }
            CacheEv::Renew { f } => {
                if !self.frontends[f].answered {
                    // No answer: try another replica.
                    self.frontends[f].primary_hint =
                        self.rng.below(self.nodes.len() as u64) as usize;
                }
                self.frontends[f].answered = false;
                let sent_at = self.frontends[f].local(self.t);
                let node = self.frontends[f].primary_hint;
                let fe_life = self.frontends[f].life;
                self.fe_send(CacheEv::LeaseAsk {
                    node,
                    f,
                    fe_life,
                    sent_at,
                });
                let every = self.opts.caches.as_ref().unwrap().lease_ms / 4;
                self.at(every, Ev::Cache(CacheEv::Renew { f }));
            }
            CacheEv::LeaseAsk {
                node,
                f,
                fe_life,
                sent_at,
            } => self.lease_ask(node, f, fe_life, sent_at),
            CacheEv::LeaseAnswer {
                f,
                fe_life,
                sent_at,
                grant,
                hint,
            } => {
                let fe = &mut self.frontends[f];
                if fe_life != fe.life {
                    return Ok(());
                }
                fe.answered = true;
                match grant {
                    Some(g) => {
                        self.stats.cache_grants += 1;
                        let now = self.base + Duration::from_millis(fe.local(self.t));
                        let sent = self.base + Duration::from_millis(sent_at);
                        fe.cache.renew_at(sent, &g, now);
                    }
                    None => {
                        fe.primary_hint = match hint {
                            Some(h) => h,
                            None => self.rng.below(self.nodes.len() as u64) as usize,
                        };
                    }
                }
            }
            CacheEv::Read { client } => {
                self.read_through_cache()?;
                let every = self.opts.caches.as_ref().unwrap().read_every_ms;
                let d = 1 + self.rng.below(2 * every);
                self.at(d, Ev::Cache(CacheEv::Read { client }));
            }
            CacheEv::Fetch {
                f,
                fe_life,
                node,
                book,
                ticket,
            } => self.fetch(f, fe_life, node, book, ticket)?,
            CacheEv::Fill {
                f,
                fe_life,
                ticket,
                value,
            } => {
                if fe_life != self.frontends[f].life {
                    return Ok(());
                }
                let now = self.instant(self.frontends[f].local(self.t));
                self.frontends[f].cache.fill_book_at(ticket, value, now);
            }
        }
        Ok(())
    }

    fn lease_ask(&mut self, i: usize, f: usize, fe_life: u64, sent_at: u64) {
        let now_local = self.nodes[i].local(self.t);
        let now = self.instant(now_local);
        let (lease, with_drift) = self.cache_lease();
        let node = &mut self.nodes[i];
        let r = node.r.as_ref().unwrap();
        let hint = r.status().primary.map(|p| (p - 1) as usize);
        let serving = r.role() == Role::Primary
            && r.is_primary_ready()
            && r.read_gate(now_local, Version::default()) == ReadGate::Serve;
        let version = to_api(node.store.last);
        let grant = match node.side.inv.as_mut() {
            Some(inv) if serving && inv.epoch == r.epoch() => inv.links[f]
                .st
                .grant(now, lease, with_drift, inv.epoch, version)
                .ok(),
            _ => None,
        };
        let hint = if grant.is_some() { Some(i) } else { hint };
        self.fe_send(CacheEv::LeaseAnswer {
            f,
            fe_life,
            sent_at,
            grant: grant.map(Box::new),
            hint,
        });
    }

    /// A lookup through a random frontend: from its cache (checked), or
    /// from a random replica (checked there), then filled.
    fn read_through_cache(&mut self) -> R<()> {
        let f = self.rng.below(self.frontends.len() as u64) as usize;
        let b = self.rng.below(self.opts.books as u64) as usize;
        let fe = &self.frontends[f];
        let now = self.instant(fe.local(self.t));
        if let Some(v) = fe.cache.lookup_at(book_id(b), now) {
            self.stats.cache_hits += 1;
            let seen = self.ck.exposed;
            let cached = v.version.seq;
            if let Some(s) = self
                .ck
                .book_writes
                .get(&b)
                .filter(|_| cached < seen)
                .and_then(|w| w.range(cached + 1..=seen).next())
            {
                return Err(self.fail(format!(
                    "stale read from cache at frontend {}: book {b} cached at seq {cached}, but a write to it at seq {s} was already seen (seen up to {seen})",
                    f + 1
                )));
            }
            return Ok(());
        }
        let ticket = fe.cache.ticket(Some(book_id(b)));
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        let fe_life = self.frontends[f].life;
        self.fe_send(CacheEv::Fetch {
            f,
            fe_life,
            node,
            book: b,
            ticket,
        });
        Ok(())
    }

    /// A frontend's read of one book at replica `i` (at least at the
    /// ticket's floor), checked like every read, then sent back to fill.
    fn fetch(&mut self, f: usize, fe_life: u64, i: usize, b: usize, ticket: Ticket) -> R<()> {
        let node = &self.nodes[i];
        let now = node.local(self.t);
        let r = node.r.as_ref().unwrap();
        let min = ticket.min_version.map(to_core).unwrap_or_default();
        if r.read_gate(now, min) != ReadGate::Serve || node.store.last.seq < r.read_index() {
            return Ok(());
        }
        let have = node.store.last.seq;
        if have < self.ck.exposed {
            return Err(self.fail(format!(
                "stale read at node {} for frontend {}: applied {have}, but a client already saw seq {}",
                i + 1,
                f + 1,
                self.ck.exposed
            )));
        }
        self.ck.exposed = have;
        self.stats.reads_served += 1;
        let value = Arc::new(LookupResponse {
            id: book_id(b),
            title: format!("book {b}"),
            topic: "simulated".into(),
            cost: Money::from_cents(100).unwrap(),
            stock: node.store.stock(b),
            version: to_api(node.store.last),
        });
        self.fe_send(CacheEv::Fill {
            f,
            fe_life,
            ticket,
            value,
        });
        Ok(())
    }
}

/// Which seqs wrote which book (for the cache check).
pub(super) type BookWrites = BTreeMap<usize, BTreeSet<u64>>;
