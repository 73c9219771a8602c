//! A seeded, deterministic simulator for the replication core.
//!
//! It steps several `Replica`s over an in-memory network that loses,
//! duplicates, delays and reorders messages, partitions links (also one
//! way), crashes and restarts nodes (also between persisting and sending),
//! replaces disks, and skews clocks (rates within ±4 %, below the 10 % drift
//! margin). Every node runs the shipped code: the replication core, the
//! driver loop (`replication::drive`) with the simulator as its host, and
//! the catalog's own state machine (`catalog::machine`) over in-memory
//! tables. Clients buy books and retry with the same request id; others
//! read through the read gate and the read index, as the catalog does.
//!
//! Checked as the run goes: at most one primary per epoch; two replicas
//! never commit different entries at the same seq; entries are applied in
//! order without gaps; an acknowledged write is the committed entry at its
//! seq; the same request id is always answered with the same result and
//! version (exactly once); stock never negative and sold == stock decrease
//! (no oversell); a versioned read let through by the gate shows the
//! client's last acknowledged write (read your writes); every read, at any
//! replica, shows every write a client saw before it, in an answer or in a
//! read (linearizable, no lease slack); a replica that may serve reads holds
//! every entry a client saw.
//! At the end, after healing: some write was acknowledged after the heal
//! (liveness); all replicas converge to identical state and log; every
//! acknowledged write is in every replica's state; successful request ids
//! == books sold.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use pygmy::api::{Book, BookId, Money, Outcome, Version as ApiVersion};
mod caches;

pub use caches::CacheOptions;
use pygmy::catalog::founds_new_cluster;
use pygmy::catalog::machine::{self, Command, MemTables, SnapshotData};
use pygmy::replication::drive::{self, Host};
use pygmy::replication::{
    Config, Entry, EntryKind, MemStorage, Message, NodeId, ProposeError, ReadGate, Ready, Replica,
    Role, Snapshot, SplitMix64, UnsafeSwitches, Version,
};
use serde::{Deserialize, Serialize};

// ----------------------------------------------------------------------
// Options
// ----------------------------------------------------------------------

/// What a schedule may do. Weights are relative.
#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub clients: usize,
    pub books: usize,
    pub stock: u64,
    pub chaos_ms: u64,
    /// After the chaos: everything healed, clients keep writing this long.
    pub quiet_ms: u64,
    pub switches: UnsafeSwitches,
    /// Bookstore model bug: check stock at propose time against the local
    /// applied state and decrement at apply without re-checking.
    pub check_at_propose: bool,
    /// State machine bug: a request id applied before is applied again.
    pub no_dedupe: bool,
    /// Teeth: a step's writes are synced only when its hard state changes
    /// (not for new entries alone), so a crash can take entries the node
    /// acknowledged.
    pub unsynced_entries: bool,
    /// Disk replacement allowed even when the disk holds entries that the
    /// other replicas do not all have.
    pub relaxed_disk_policy: bool,
    /// Snapshots are built beside the driver, as the catalog builds them:
    /// `take_snapshot` answers later, and the bytes (of the version applied
    /// when it was asked) reach the core at the node's next turn, after
    /// more entries may have applied; a crash meanwhile loses them.
    pub deferred_snapshots: bool,
    pub fault_every_ms: (u64, u64),
    pub w_crash: u32,
    pub w_restart: u32,
    pub w_partition: u32,
    pub w_heal: u32,
    pub w_net: u32,
    pub w_disk: u32,
    /// Stop-the-world pauses: a node processes nothing for 1–3 leases while
    /// time (and its clock) goes on; what was sent to it waits.
    pub w_pause: u32,
    /// A down node's disk is put back to an older copy of itself (taken
    /// earlier in the run), as an operator restoring a backup would.
    pub w_restore: u32,
    /// Bug: a restored copy is taken for the disk it was copied from (same
    /// incarnation), so it votes and counts at once, with what it forgot.
    pub trust_restored_copies: bool,
    /// Bug: a replica still starting answers a blank disk's question as if
    /// its own disk were blank, instead of with what its disk holds.
    pub starting_reports_blank: bool,
    /// Driver bug: a read is let through by the lease as of the node's last
    /// event, not the clock when it is served (so a pause goes unnoticed).
    pub reads_at_last_event: bool,
    /// Probability that a crash happens between persisting and sending.
    pub crash_mid_ready: f64,
    pub read_every_ms: u64,
    pub snapshot_threshold: u64,
    /// The core's snapshot chunk size: small, so snapshots (tens of KB
    /// here) travel in many chunks through the loss, reordering and crashes.
    pub snapshot_chunk_bytes: usize,
    pub check_liveness: bool,
    /// Weights of the partition kinds: primary alone, any node alone,
    /// majority/minority split, one-way link, deaf primary (nothing reaches
    /// it, its messages go out).
    pub partition_kinds: [u32; 5],
    /// Longest "long" message delay.
    pub long_delay_max_ms: u64,
    /// Overrides of the core's timing (lease, heartbeat, election timeout).
    pub timing: Option<(u64, u64, u64)>,
    /// Override of the core's drift margin (clocks here differ by up to 10 %).
    pub drift_margin: Option<f64>,
    /// Lowest long-delay and duplication rates during the chaos.
    pub min_long_delay: f64,
    pub min_dup: f64,
    /// Frontend caches (none: reads go to replicas only).
    pub caches: Option<CacheOptions>,
}

impl Options {
    pub fn new(nodes: usize) -> Self {
        Options {
            nodes,
            clients: 3,
            books: 2,
            stock: 40,
            chaos_ms: 2000,
            quiet_ms: 2500,
            switches: UnsafeSwitches::default(),
            check_at_propose: false,
            no_dedupe: false,
            unsynced_entries: false,
            relaxed_disk_policy: false,
            deferred_snapshots: false,
            fault_every_ms: (80, 400),
            w_crash: 3,
            w_restart: 4,
            w_partition: 3,
            w_heal: 2,
            w_net: 2,
            w_disk: 1,
            w_pause: 1,
            w_restore: 0,
            trust_restored_copies: false,
            starting_reports_blank: false,
            reads_at_last_event: false,
            crash_mid_ready: 0.3,
            read_every_ms: 20,
            snapshot_threshold: 48,
            snapshot_chunk_bytes: 1024,
            check_liveness: true,
            partition_kinds: [1, 1, 1, 1, 1],
            long_delay_max_ms: 600,
            timing: None,
            drift_margin: None,
            min_long_delay: 0.0,
            min_dup: 0.0,
            caches: None,
        }
    }
}

impl Options {
    /// Snapshots every few entries and messages reordered hard (many long
    /// delays, duplicates): appends overtake each other and snapshots.
    pub fn tiny_snapshots(nodes: usize) -> Self {
        let mut o = Options::new(nodes);
        o.snapshot_threshold = 3;
        o.snapshot_chunk_bytes = 256;
        o.w_net = 6;
        o.w_partition = 1;
        o.w_crash = 3;
        o.long_delay_max_ms = 300;
        o.min_long_delay = 0.2;
        o.min_dup = 0.1;
        o
    }

    /// A fault mix chosen by the seed: balanced, crash-heavy (frequent
    /// crashes and restarts, short gaps), or network-heavy (partitions,
    /// loss, long delays); and a snapshot chunk size from 128 bytes
    /// (hundreds of chunks a snapshot) to 8 KiB (a few).
    pub fn varied(nodes: usize, seed: u64) -> Self {
        let mut o = Options::new(nodes);
        if nodes > 3 {
            o.clients = 4;
        }
        o.snapshot_chunk_bytes = [128, 512, 2048, 8192][(seed / 3 % 4) as usize];
        match seed % 3 {
            0 => {}
            1 => {
                o.w_crash = 8;
                o.w_restart = 8;
                o.w_net = 6;
                o.w_disk = 3;
                o.partition_kinds = [4, 1, 0, 2, 1];
                o.crash_mid_ready = 0.1;
                o.fault_every_ms = (30, 300);
                o.chaos_ms = 2600;
            }
            _ => {
                o.w_crash = 1;
                o.w_partition = 6;
                o.w_net = 4;
                o.long_delay_max_ms = 900;
                o.fault_every_ms = (50, 250);
            }
        }
        o
    }
}

pub fn config(id: NodeId, inc: u64, n: usize, seed: u64, opts: &Options) -> Config {
    let mut c = Config::new(id, inc, (1..=n as u64).collect(), seed);
    c.snapshot_threshold = opts.snapshot_threshold;
    c.snapshot_chunk_bytes = opts.snapshot_chunk_bytes;
    c.max_batch = 32;
    c.unsafe_switches = opts.switches.clone();
    c.fence_caches = opts.caches.is_some();
    if let Some(m) = opts.drift_margin {
        c.drift_margin = m;
    }
    if let Some((lease, hb, election)) = opts.timing {
        c.lease_ms = lease;
        c.heartbeat_ms = hb;
        c.election_timeout_ms = election;
    }
    c
}

// ----------------------------------------------------------------------
// The bookstore: the catalog's own state machine (`catalog::machine`)
// ----------------------------------------------------------------------

/// A node's bookstore: the shipped state machine's tables, the last applied
/// entry, and (for the checker) what was sold of each book.
#[derive(Clone, Debug, PartialEq)]
pub struct Store {
    pub tables: MemTables,
    pub last: Version,
    pub sold: BTreeMap<BookId, u64>,
}

/// A snapshot's bytes: the state machine's snapshot and the last entry.
#[derive(Serialize, Deserialize)]
struct StoreSnapshot {
    data: SnapshotData,
    last: Version,
}

pub fn book_id(b: usize) -> BookId {
    BookId::new(b as u64 + 1).unwrap()
}

impl Store {
    fn new(books: usize, stock: u64) -> Self {
        let mut tables = MemTables::default();
        for b in 0..books {
            tables.books.insert(
                book_id(b),
                Book {
                    id: book_id(b),
                    title: format!("book {b}"),
                    topic: "simulated".into(),
                    cost: Money::from_cents(100).unwrap(),
                    stock,
                },
            );
        }
        Store {
            tables,
            last: Version::default(),
            sold: BTreeMap::new(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&StoreSnapshot {
            data: self.tables.to_snapshot(),
            last: self.last,
        })
        .unwrap()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let s: StoreSnapshot =
            serde_json::from_slice(bytes).map_err(|e| format!("bad snapshot: {e}"))?;
        let mut store = Store {
            tables: MemTables::from_snapshot(s.data),
            last: s.last,
            sold: BTreeMap::new(),
        };
        store.recount();
        Ok(store)
    }

    /// `sold` from the answers: one per successful buy.
    fn recount(&mut self) {
        self.sold.clear();
        for (o, _) in self.tables.answers.values() {
            if let Outcome::Bought { book_id, .. } = o {
                *self.sold.entry(*book_id).or_default() += 1;
            }
        }
    }

    fn stock(&self, b: usize) -> u64 {
        self.tables.books[&book_id(b)].stock
    }

    /// The answer a request id got: (bought?, version first applied at).
    fn answer(&self, rid: &str) -> Option<(bool, Version)> {
        self.tables
            .answers
            .get(rid)
            .map(|(o, v)| (matches!(o, Outcome::Bought { .. }), to_core(*v)))
    }
}

fn to_api(v: Version) -> ApiVersion {
    ApiVersion {
        epoch: v.epoch,
        seq: v.seq,
    }
}

fn to_core(v: ApiVersion) -> Version {
    Version::new(v.epoch, v.seq)
}

// ----------------------------------------------------------------------
// Events
// ----------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Reply {
    Ack {
        rid: String,
        ok: bool,
        version: Version,
    },
    Redirect {
        rid: String,
        to: usize,
    },
    Retry {
        rid: String,
    },
}

#[derive(Debug)]
enum Ev {
    Tick(usize),
    Deliver {
        to: usize,
        from: usize,
        msg: Box<pygmy::replication::Message>,
    },
    Request {
        client: usize,
        node: usize,
        rid: String,
        book: usize,
    },
    Answer {
        client: usize,
        reply: Reply,
    },
    Timeout {
        client: usize,
        rid: String,
        attempt: u64,
    },
    Next {
        client: usize,
    },
    Read {
        client: usize,
    },
    Fault,
    EndChaos,
    Cache(caches::CacheEv),
}

struct Item {
    t: u64,
    seq: u64,
    ev: Ev,
}
impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

// ----------------------------------------------------------------------
// Nodes and clients
// ----------------------------------------------------------------------

struct Node {
    id: NodeId,
    up: bool,
    r: Option<Replica>,
    disk: MemStorage,
    /// The disk as of its last synced write: what a crash leaves (a step
    /// that only moved the commit point is not synced, see `Ready::sync`).
    synced: MemStorage,
    inc: u64,
    store: Store,
    boot_t: u64,
    clock_off: u64,
    rate: f64,
    /// seq -> (client, rid) awaiting commit
    pending: BTreeMap<u64, (usize, String)>,
    crash_armed: bool,
    /// An armed crash hits before the step's persist (after what the step
    /// sends first: a primary's appends), not after it.
    crash_before_persist: bool,
    /// Paused (stop-the-world) until this simulated time.
    paused_until: u64,
    /// Simulated time of the last event this node handled.
    last_event: u64,
    /// A copy of its disk taken earlier (a backup), to restore.
    old_copy: Option<MemStorage>,
    /// Process lives: events of an earlier one are void.
    life: u64,
    /// Cache invalidation state while primary.
    side: caches::PrimarySide,
    /// A snapshot being built beside the driver (`deferred_snapshots`).
    deferred_snapshot: Option<(Version, Vec<u8>)>,
}

impl Node {
    fn local(&self, t: u64) -> u64 {
        self.clock_off + ((t - self.boot_t) as f64 * self.rate) as u64
    }
}

struct Client {
    rid: Option<(String, usize)>,
    n: u64,
    attempt: u64,
    target: usize,
    last_ack: Version,
    last_rid: Option<String>,
}

// ----------------------------------------------------------------------
// Checker
// ----------------------------------------------------------------------

#[derive(Default)]
struct Checker {
    /// seq -> the committed entry's (version, request id), as first seen.
    committed: FastMap<u64, (Version, String)>,
    /// epoch -> the node that was primary in it.
    primaries: FastMap<u64, NodeId>,
    /// request id -> (bought?, version) as first answered to a client.
    acked: FastMap<String, (bool, Version)>,
    /// (time, highest seq answered so far), monotone.
    answered: Vec<(u64, u64)>,
    /// Highest seq some client saw: in an acknowledgement, or in the state a
    /// read was served from. A read that starts later must show at least it.
    exposed: u64,
    /// Seqs of the committed writes to each book.
    book_writes: caches::BookWrites,
}

/// What a run reports.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub snapshots_installed: usize,
    /// Snapshot chunks sent (a snapshot travels in several).
    pub snapshot_chunks: usize,
    pub disks_replaced: usize,
    pub disks_restored: usize,
    /// Blank disks that founded a new cluster (at the very start of a run,
    /// when no replica has history yet).
    pub founded: usize,
    pub crashes: usize,
    pub pauses: usize,
    pub acked: usize,
    pub reads_served: usize,
    pub primaries: usize,
    pub events: u64,
    pub cache_hits: usize,
    pub cache_grants: usize,
    pub frontends_restarted: usize,
}

pub struct Sim {
    seed: u64,
    rng: SplitMix64,
    t: u64,
    seq: u64,
    queue: BinaryHeap<Item>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    /// blocked[from][to]
    blocked: Vec<Vec<bool>>,
    loss: f64,
    dup: f64,
    long_delay: f64,
    chaos: bool,
    heal_t: u64,
    acked_after_heal: bool,
    next_inc: u64,
    ck: Checker,
    opts: Options,
    stats: Stats,
    frontends: Vec<caches::Frontend>,
    /// Every clock's zero, as an `Instant` (the cache's time type).
    base: std::time::Instant,
    token: u64,
    op_id: u64,
    /// Frontends cut off from the catalog replicas.
    fe_cut: Vec<bool>,
}

type R<T> = Result<T, String>;

/// FNV-1a: a fast, deterministic hasher for the simulator's maps.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);
impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        self.0 = h;
    }
}
pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// How often each node's clock ticks the core.
const TICK_MS: u64 = 20;

/// How long a restarted replica counts as still starting.
const STARTING_MS: u64 = 100;

impl Sim {
    pub fn new(seed: u64, opts: Options) -> Self {
        let mut rng = SplitMix64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xA076_1D64_78BD_642F);
        let n = opts.nodes;
        let mut nodes = Vec::new();
        for i in 0..n {
            let inc = 1;
            let disk = MemStorage::bootstrap(inc);
            // Rates in [0.953, 1.048]: any two clocks differ by up to 9.97 %,
            // just inside the 10 % drift margin every lease allows for.
            let rate = 0.953 + rng.below(96) as f64 / 1000.0;
            let off = rng.below(1_000_000);
            let cfg = config(i as u64 + 1, inc, n, rng.next_u64(), &opts);
            let r = Replica::new(cfg, &disk, off);
            nodes.push(Node {
                id: i as u64 + 1,
                up: true,
                r: Some(r),
                synced: disk.clone(),
                disk,
                inc,
                store: Store::new(opts.books, opts.stock),
                boot_t: 0,
                clock_off: off,
                rate,
                pending: BTreeMap::new(),
                crash_armed: false,
                crash_before_persist: false,
                paused_until: 0,
                last_event: 0,
                old_copy: None,
                life: 0,
                side: caches::PrimarySide::default(),
                deferred_snapshot: None,
            });
        }
        let clients = (0..opts.clients)
            .map(|_| Client {
                rid: None,
                n: 0,
                attempt: 0,
                target: 0,
                last_ack: Version::default(),
                last_rid: None,
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            t: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            clients,
            blocked: vec![vec![false; n]; n],
            loss: 0.0,
            dup: opts.min_dup,
            long_delay: opts.min_long_delay,
            chaos: true,
            heal_t: 0,
            acked_after_heal: false,
            next_inc: 2,
            ck: Checker::default(),
            opts,
            stats: Stats::default(),
            frontends: Vec::new(),
            base: std::time::Instant::now(),
            token: 0,
            op_id: 0,
            fe_cut: Vec::new(),
        };
        for i in 0..n {
            let ph = sim.rng.below(10);
            sim.at(ph, Ev::Tick(i));
        }
        for c in 0..sim.clients.len() {
            let d = 50 + sim.rng.below(100);
            sim.at(d, Ev::Next { client: c });
            let d = sim.rng.below(50);
            sim.at(d, Ev::Read { client: c });
        }
        sim.new_frontends();
        let d = sim.fault_gap();
        sim.at(d, Ev::Fault);
        let chaos = sim.opts.chaos_ms;
        sim.at(chaos, Ev::EndChaos);
        sim
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Item {
            t: self.t + delay,
            seq: self.seq,
            ev,
        });
    }

    fn fault_gap(&mut self) -> u64 {
        let (a, b) = self.opts.fault_every_ms;
        a + self.rng.below(b - a + 1)
    }

    fn fail(&self, what: String) -> String {
        format!("seed {} at t={}ms: {}", self.seed, self.t, what)
    }

    /// Run the schedule: chaos, heal, quiet, convergence.
    pub fn run(mut self) -> R<Stats> {
        let end = self.opts.chaos_ms + self.opts.quiet_ms;
        while let Some(item) = self.queue.pop() {
            if item.t > end {
                // Not lost: `converge` goes on from it (a node whose next
                // tick this is would never tick again).
                self.queue.push(item);
                break;
            }
            self.t = item.t;
            self.stats.events += 1;
            if self.stats.events > 3_000_000 {
                let mut h: BTreeMap<String, usize> = BTreeMap::new();
                for it in self.queue.iter().take(100000) {
                    let k = format!("{:?}", it.ev).chars().take(60).collect::<String>();
                    *h.entry(k).or_default() += 1;
                }
                let mut v: Vec<_> = h.into_iter().collect();
                v.sort_by_key(|x| std::cmp::Reverse(x.1));
                v.truncate(10);
                return Err(self.fail(format!(
                    "event storm: {} queued; {:?}",
                    self.queue.len(),
                    v
                )));
            }
            self.handle(item.ev)?;
        }
        self.t = end;
        if self.opts.check_liveness && !self.acked_after_heal {
            let dump = self.dump();
            return Err(self.fail(format!(
                "liveness: no write acknowledged after the faults healed\n  {dump}"
            )));
        }
        self.converge()?;
        Ok(self.stats)
    }

    fn handle(&mut self, ev: Ev) -> R<()> {
        match ev {
            Ev::Tick(i) if self.nodes[i].paused_until > self.t => {
                let wake = self.nodes[i].paused_until - self.t;
                self.at(wake, Ev::Tick(i));
            }
            Ev::Deliver { to, from, msg } if self.nodes[to].paused_until > self.t => {
                let wake = self.nodes[to].paused_until - self.t;
                self.at(wake, Ev::Deliver { to, from, msg });
            }
            Ev::Request {
                client,
                node,
                rid,
                book,
            } if self.nodes[node].paused_until > self.t => {
                let wake = self.nodes[node].paused_until - self.t;
                self.at(
                    wake,
                    Ev::Request {
                        client,
                        node,
                        rid,
                        book,
                    },
                );
            }
            Ev::Tick(i) => {
                if self.nodes[i].up {
                    let now = self.nodes[i].local(self.t);
                    self.nodes[i].r.as_mut().unwrap().tick(now);
                    self.process(i)?;
                }
                self.at(TICK_MS, Ev::Tick(i));
            }
            Ev::Deliver { to, from, msg } => {
                if self.nodes[to].up && !self.blocked[from][to] {
                    let now = self.nodes[to].local(self.t);
                    let from_id = self.nodes[from].id;
                    if std::env::var_os("PYGMY_SIM_TRACE_MSGS").is_some() {
                        eprintln!("[{:>5}] {} -> {}: {:?}", self.t, from + 1, to + 1, msg);
                    }
                    self.nodes[to].r.as_mut().unwrap().step(now, from_id, *msg);
                    self.process(to)?;
                }
            }
            Ev::Request {
                client,
                node,
                rid,
                book,
            } => self.on_request(client, node, rid, book)?,
            Ev::Answer { client, reply } => self.on_answer(client, reply)?,
            Ev::Timeout {
                client,
                rid,
                attempt,
            } => {
                let c = &self.clients[client];
                if c.attempt == attempt && c.rid.as_ref().is_some_and(|(r, _)| *r == rid) {
                    let target = self.rng.below(self.nodes.len() as u64) as usize;
                    self.clients[client].target = target;
                    self.send_request(client);
                }
            }
            Ev::Next { client } => {
                let stop_writes = self.t + 900 > self.opts.chaos_ms + self.opts.quiet_ms;
                if stop_writes {
                    return Ok(());
                }
                let c = &mut self.clients[client];
                c.n += 1;
                let rid = format!("c{client}-{}", c.n);
                let book = self.rng.below(self.opts.books as u64) as usize;
                self.clients[client].rid = Some((rid, book));
                self.send_request(client);
            }
            Ev::Read { client } => {
                self.on_read(client)?;
                let d = 1 + self.rng.below(self.opts.read_every_ms * 2);
                self.at(d, Ev::Read { client });
            }
            Ev::Fault => {
                if self.chaos {
                    self.take_backup();
                    self.fault()?;
                    self.trace(&format!(
                        "fault; blocked {:?} loss {} dup {} long {}",
                        self.blocked, self.loss, self.dup, self.long_delay
                    ));
                    let d = self.fault_gap();
                    self.at(d, Ev::Fault);
                }
            }
            Ev::EndChaos => {
                self.heal_all()?;
                self.trace("healed");
            }
            Ev::Cache(ev) => self.on_cache_event(ev)?,
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Driver: persist, send, apply
    // ------------------------------------------------------------------

    /// One turn of the shipped driver loop (`replication::drive`) at node
    /// `i`, with the simulator as its host; then the invariants.
    fn process(&mut self, i: usize) -> R<()> {
        self.nodes[i].last_event = self.t;
        let Node {
            r,
            disk,
            synced,
            store,
            pending,
            crash_armed,
            crash_before_persist,
            deferred_snapshot,
            ..
        } = &mut self.nodes[i];
        let mut host = SimHost {
            node: i,
            disk,
            synced,
            unsynced_entries: self.opts.unsynced_entries,
            store,
            pending,
            ck: &mut self.ck,
            initial: self.opts.stock,
            sw: machine::Switches {
                decrement_unchecked: self.opts.check_at_propose,
                no_dedupe: self.opts.no_dedupe,
                ..machine::Switches::default()
            },
            crash_armed: *crash_armed,
            crash_before_persist: *crash_before_persist,
            crashed: false,
            out: Vec::new(),
            answers: Vec::new(),
            snapshots_installed: 0,
            defer_snapshots: self.opts.deferred_snapshots,
            deferred_snapshot,
        };
        // A snapshot built beside the driver since its last turn reaches the
        // core after this turn's step, which may apply more entries first:
        // the core then takes bytes of a version older than it has applied.
        let earlier = host.deferred_snapshot.take();
        let mut res = drive::advance(r.as_mut().unwrap(), &mut host).map(|_| ());
        if let (Ok(()), Some((v, data)), false) = (&res, earlier, host.crashed) {
            res = drive::snapshot_built(r.as_mut().unwrap(), &mut host, v, data);
        }
        let SimHost {
            crashed,
            out,
            answers,
            snapshots_installed,
            ..
        } = host;
        res.map_err(|e| self.fail(e))?;
        self.stats.snapshots_installed += snapshots_installed;
        // Whenever a replica may serve reads, its log holds every entry a
        // client saw (what its read index counts on).
        if let Some(r) = &self.nodes[i].r
            && r.read_gate(self.nodes[i].local(self.t), Version::default()) == ReadGate::Serve
            && r.status().last.seq < self.ck.exposed
        {
            return Err(self.fail(format!(
                "a replica that may serve reads lacks committed entries: node {} holds up to {}, a client saw seq {}",
                i + 1,
                r.status().last.seq,
                self.ck.exposed
            )));
        }
        if let Some(r) = &self.nodes[i].r
            && r.role() == Role::Primary
        {
            let (e, id) = (r.epoch(), self.nodes[i].id);
            if let Some(other) = self.ck.primaries.insert(e, id)
                && other != id
            {
                return Err(self.fail(format!("two primaries in epoch {e}: {other} and {id}")));
            }
        }
        if crashed {
            // Crashed in the step: what it sent before persisting is out.
            for (to, msg) in out {
                let to = (to - 1) as usize;
                if to < self.nodes.len() {
                    self.send(i, to, msg);
                }
            }
            self.crash(i);
            return Ok(());
        }
        for (to, msg) in out {
            let to = (to - 1) as usize;
            if to < self.nodes.len() {
                self.send(i, to, msg);
            }
        }
        self.cache_upkeep(i);
        if self.opts.caches.is_some() {
            self.answers_with_caches(i, answers);
        } else {
            for (client, reply) in answers {
                self.answer(client, reply);
            }
        }
        Ok(())
    }

    fn send(&mut self, from: usize, to: usize, msg: pygmy::replication::Message) {
        if matches!(msg.body, pygmy::replication::Body::SnapshotChunk(_)) {
            self.stats.snapshot_chunks += 1;
        }
        if self.blocked[from][to] || self.rng.chance(self.loss) {
            return;
        }
        let msg = Box::new(msg);
        if self.rng.chance(self.dup) {
            let d = self.delay();
            self.at(
                d,
                Ev::Deliver {
                    to,
                    from,
                    msg: msg.clone(),
                },
            );
        }
        let d = self.delay();
        self.at(d, Ev::Deliver { to, from, msg });
    }

    fn delay(&mut self) -> u64 {
        if self.rng.chance(self.long_delay) {
            20 + self.rng.below(self.opts.long_delay_max_ms)
        } else {
            1 + self.rng.below(4)
        }
    }

    fn answer(&mut self, client: usize, reply: Reply) {
        if std::env::var_os("PYGMY_SIM_TRACE").is_some() {
            eprintln!(
                "[{:>5}] answer to client {client}: {reply:?}\n  {}",
                self.t,
                self.dump()
            );
        }
        if let Reply::Ack { version, .. } = &reply {
            let prev = self.ck.answered.last().map_or(0, |x| x.1);
            self.ck.answered.push((self.t, prev.max(version.seq)));
            self.ck.exposed = self.ck.exposed.max(version.seq);
        }
        if self.rng.chance(self.loss) {
            return;
        }
        let d = self.delay();
        self.at(d, Ev::Answer { client, reply });
    }

    // ------------------------------------------------------------------
    // Clients
    // ------------------------------------------------------------------

    fn send_request(&mut self, client: usize) {
        let c = &mut self.clients[client];
        let Some((rid, book)) = c.rid.clone() else {
            return;
        };
        c.attempt += 1;
        let attempt = c.attempt;
        let node = c.target;
        let d = self.delay();
        self.at(
            d,
            Ev::Request {
                client,
                node,
                rid: rid.clone(),
                book,
            },
        );
        self.at(
            250,
            Ev::Timeout {
                client,
                rid,
                attempt,
            },
        );
    }

    fn on_request(&mut self, client: usize, i: usize, rid: String, book: usize) -> R<()> {
        if !self.nodes[i].up {
            return Ok(());
        }
        if self.opts.caches.is_some() && self.request_with_caches(client, i, rid.clone(), book)? {
            return Ok(());
        }
        let now = self.nodes[i].local(self.t);
        let node = &mut self.nodes[i];
        let r = node.r.as_mut().unwrap();
        if let Some((ok, version)) = node.store.answer(&rid)
            && r.is_primary_ready()
        {
            self.answer(client, Reply::Ack { rid, ok, version });
            return Ok(());
        }
        if self.opts.check_at_propose && node.store.stock(book) == 0 {
            // The broken variant checks the stock here, not at apply.
            self.answer(client, Reply::Retry { rid });
            return Ok(());
        }
        let op = Command::Buy {
            book_id: book_id(book),
        }
        .encode();
        match r.propose(now, rid.clone(), op) {
            Ok(v) => {
                node.pending.insert(v.seq, (client, rid));
                self.process(i)?;
            }
            Err(ProposeError::NotPrimary { primary: Some(p) }) => {
                let to = (p - 1) as usize;
                self.answer(client, Reply::Redirect { rid, to });
            }
            Err(_) => self.answer(client, Reply::Retry { rid }),
        }
        Ok(())
    }

    fn on_answer(&mut self, client: usize, reply: Reply) -> R<()> {
        let current = self.clients[client].rid.as_ref().map(|(r, _)| r.clone());
        match reply {
            Reply::Ack { rid, ok, version } => {
                if let Some(&(ok0, v0)) = self.ck.acked.get(&rid) {
                    if (ok0, v0) != (ok, version) {
                        return Err(self.fail(format!(
                            "exactly once: {rid} answered {ok0} at {v0:?}, then {ok} at {version:?}"
                        )));
                    }
                } else {
                    self.ck.acked.insert(rid.clone(), (ok, version));
                    // the acknowledged write must be the committed entry at its seq
                    match self.ck.committed.get(&version.seq) {
                        Some((v, r)) if *v == version && *r == rid => {}
                        other => {
                            let msg = format!("acked {rid} at {version:?} but committed {other:?}");
                            return Err(self.fail(msg));
                        }
                    }
                }
                if current.as_deref() == Some(rid.as_str()) {
                    if !self.chaos {
                        self.acked_after_heal = true;
                    }
                    self.stats.acked += 1;
                    let c = &mut self.clients[client];
                    c.rid = None;
                    c.last_ack = c.last_ack.max(version);
                    c.last_rid = Some(rid);
                    let d = self.rng.below(20);
                    self.at(d, Ev::Next { client });
                }
            }
            Reply::Redirect { rid, to } => {
                if current.as_deref() == Some(rid.as_str()) && to < self.nodes.len() {
                    self.clients[client].target = to;
                    self.send_request(client);
                }
            }
            Reply::Retry { rid } => {
                if current.as_deref() == Some(rid.as_str()) {
                    if self.rng.chance(0.3) {
                        self.clients[client].target =
                            self.rng.below(self.nodes.len() as u64) as usize;
                    }
                    let c = &mut self.clients[client];
                    c.attempt += 1; // the pending timeout is void
                    let d = 10 + self.rng.below(30);
                    let attempt = c.attempt;
                    let (rid, _) = c.rid.clone().unwrap();
                    self.at(
                        d,
                        Ev::Timeout {
                            client,
                            rid,
                            attempt,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// A read through the gate, versioned (at least the client's last write)
    /// or not, at a random node; checked against what was answered.
    fn on_read(&mut self, client: usize) -> R<()> {
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        if !self.nodes[i].up || self.nodes[i].paused_until > self.t {
            return Ok(()); // a paused node's readers are paused too
        }
        let versioned = self.rng.chance(0.5);
        let min = if versioned {
            self.clients[client].last_ack
        } else {
            Version::default()
        };
        let node = &self.nodes[i];
        let now = if self.opts.reads_at_last_event {
            node.local(node.last_event.max(node.boot_t))
        } else {
            node.local(self.t)
        };
        let r = node.r.as_ref().unwrap();
        if r.read_gate(now, min) != ReadGate::Serve {
            return Ok(());
        }
        // The driver serves a read only once it has applied the read index
        // taken when the read arrived (here: now; otherwise it waits).
        let have = node.store.last.seq;
        if have < r.read_index() {
            return Ok(());
        }
        self.stats.reads_served += 1;
        if versioned
            && let Some(rid) = &self.clients[client].last_rid
            && (have < min.seq || node.store.answer(rid).is_none())
        {
            return Err(self.fail(format!(
                "read your writes: node {} served a read at {min:?} without {rid} (applied {have})",
                i + 1
            )));
        }
        // Linearizable: every read, at any replica, shows every write
        // committed (and so possibly seen or acknowledged) before it.
        let exposed = self.ck.exposed;
        if have < exposed {
            let role = if r.role() == Role::Primary {
                "primary"
            } else {
                "backup"
            };
            return Err(self.fail(format!(
                "stale read at {role} {}: applied {have}, but a client already saw seq {exposed}",
                i + 1
            )));
        }
        self.ck.exposed = have;
        Ok(())
    }

    // ------------------------------------------------------------------
    // Faults
    // ------------------------------------------------------------------

    fn crash(&mut self, i: usize) {
        self.stats.crashes += 1;
        let node = &mut self.nodes[i];
        // What was written but not synced is gone.
        node.disk = node.synced.clone();
        node.up = false;
        node.r = None;
        node.pending.clear();
        node.crash_armed = false;
        node.paused_until = 0;
        node.life += 1;
        node.side = caches::PrimarySide::default();
        node.deferred_snapshot = None;
    }

    /// What each peer of blank node `i` answers when asked whether it has
    /// history (`catalog::founds_new_cluster`): nothing when down, paused or
    /// cut off; the epoch and commit of its disk otherwise — also while it
    /// is itself still starting (the first `STARTING_MS` after a restart).
    fn start_answers(&self, i: usize) -> Vec<Option<(u64, u64)>> {
        (0..self.nodes.len())
            .filter(|&j| j != i)
            .map(|j| {
                let p = &self.nodes[j];
                if !p.up || p.paused_until > self.t || self.blocked[i][j] || self.blocked[j][i] {
                    return None;
                }
                let starting = self.t < p.boot_t + STARTING_MS;
                if starting && self.opts.starting_reports_blank {
                    return Some((0, 0));
                }
                Some((p.disk.hard_state.epoch, p.disk.hard_state.commit.seq))
            })
            .collect()
    }

    fn restart(&mut self, i: usize) -> R<()> {
        // A blank disk first asks its peers whether the cluster is new: if
        // so it founds it as a voter, otherwise it joins as a learner.
        let d = &self.nodes[i].disk;
        if d.hard_state.incarnation == 0 && d.entries.is_empty() && d.snapshot.is_none() {
            let answers = self.start_answers(i);
            if founds_new_cluster(&answers) == Some(true) {
                self.stats.founded += 1;
                let inc = self.nodes[i].inc;
                self.nodes[i].disk = MemStorage::bootstrap(inc);
            }
        }
        let seed = self.rng.next_u64();
        let off = self.rng.below(1_000_000);
        let opts = self.opts.clone();
        let n = self.nodes.len();
        let node = &mut self.nodes[i];
        node.synced = node.disk.clone();
        node.boot_t = self.t;
        node.clock_off = off;
        node.store = match &node.disk.snapshot {
            Some(s) => Store::decode(&s.data).unwrap(),
            None => Store::new(opts.books, opts.stock),
        };
        let cfg = config(node.id, node.inc, n, seed, &opts);
        node.r = Some(Replica::new(cfg, &node.disk, off));
        node.up = true;
        self.process(i)
    }

    fn primary(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .r
                .as_ref()
                .is_some_and(|r| r.role() == Role::Primary)
        })
    }

    fn pick(&mut self, up: bool) -> Option<usize> {
        let c: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up == up)
            .collect();
        if c.is_empty() {
            None
        } else {
            Some(c[self.rng.below(c.len() as u64) as usize])
        }
    }

    fn isolate(&mut self, i: usize) {
        let n = self.nodes.len();
        for j in 0..n {
            if j != i {
                self.blocked[i][j] = true;
                self.blocked[j][i] = true;
            }
        }
    }

    fn heal_links(&mut self) {
        for row in &mut self.blocked {
            row.iter_mut().for_each(|b| *b = false);
        }
        self.fe_cut.iter_mut().for_each(|c| *c = false);
    }

    fn fault(&mut self) -> R<()> {
        let o = &self.opts;
        let weights = [
            o.w_crash,
            o.w_restart,
            o.w_partition,
            o.w_heal,
            o.w_net,
            o.w_disk,
            o.w_pause,
            o.w_restore,
        ];
        let total: u32 = weights.iter().sum();
        let mut x = self.rng.below(total as u64) as u32;
        let mut kind = 0;
        for (k, w) in weights.iter().enumerate() {
            if x < *w {
                kind = k;
                break;
            }
            x -= w;
        }
        let n = self.nodes.len();
        match kind {
            0 => {
                // crash: the primary more often than not
                let target = if self.rng.chance(0.5) {
                    self.primary()
                } else {
                    self.pick(true)
                };
                if let Some(i) = target {
                    if self.rng.chance(self.opts.crash_mid_ready) {
                        self.nodes[i].crash_armed = true;
                        self.nodes[i].crash_before_persist = self.rng.chance(0.5);
                    } else {
                        self.crash(i);
                    }
                }
            }
            1 => {
                if let Some(i) = self.pick(false) {
                    self.restart(i)?;
                }
            }
            2 => {
                self.heal_links();
                if !self.frontends.is_empty() && self.rng.chance(0.5) {
                    // A frontend cut off from every catalog replica, or
                    // restarted (an empty cache, no lease).
                    let f = self.rng.below(self.frontends.len() as u64) as usize;
                    if self.rng.chance(0.3) {
                        self.restart_frontend(f);
                    } else {
                        self.fe_cut[f] = true;
                    }
                }
                let w = self.opts.partition_kinds;
                let mut x = self.rng.below(w.iter().sum::<u32>().max(1) as u64) as u32;
                let mut kind = 0;
                for (k, wk) in w.iter().enumerate() {
                    if x < *wk {
                        kind = k;
                        break;
                    }
                    x -= wk;
                }
                match kind {
                    0 => {
                        if let Some(p) = self.primary() {
                            self.isolate(p);
                        }
                    }
                    1 => {
                        let i = self.rng.below(n as u64) as usize;
                        self.isolate(i);
                    }
                    2 => {
                        // clean split: a random minority
                        let k = self.rng.below((n / 2) as u64 + 1) as usize;
                        let mut side = vec![false; n];
                        for _ in 0..k.max(1) {
                            side[self.rng.below(n as u64) as usize] = true;
                        }
                        for a in 0..n {
                            for b in 0..n {
                                if side[a] != side[b] {
                                    self.blocked[a][b] = true;
                                }
                            }
                        }
                    }
                    3 => {
                        let a = self.rng.below(n as u64) as usize;
                        let b = (a + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                        self.blocked[a][b] = true;
                    }
                    _ => {
                        if let Some(p) = self.primary() {
                            for j in 0..n {
                                self.blocked[j][p] = j != p;
                            }
                        }
                    }
                }
            }
            3 => self.heal_links(),
            4 => {
                self.loss = [0.0, 0.02, 0.1, 0.3][self.rng.below(4) as usize];
                self.dup = [0.0f64, 0.05, 0.2][self.rng.below(3) as usize].max(self.opts.min_dup);
                self.long_delay =
                    [0.0f64, 0.02, 0.1][self.rng.below(3) as usize].max(self.opts.min_long_delay);
            }
            6 => {
                // Stop the world at the primary (often) or any live node.
                let target = if self.rng.chance(0.5) {
                    self.primary()
                } else {
                    self.pick(true)
                };
                if let Some(i) = target {
                    let lease = self.opts.timing.map_or(500, |t| t.0);
                    let d = lease + self.rng.below(2 * lease);
                    self.nodes[i].paused_until = self.t + d;
                    self.stats.pauses += 1;
                }
            }
            7 => {
                // Restore a down node's disk from its backup. The copy is
                // told apart from the disk it was taken from (a new
                // incarnation: see `storage::claim`), so it is a learner
                // holding old data; one disk failure at a time, as below.
                if let Some(i) = self.pick(false)
                    && self.nodes[i].old_copy.is_some()
                    && self.disk_replaceable(i)
                {
                    self.stats.disks_restored += 1;
                    let trust = self.opts.trust_restored_copies;
                    let node = &mut self.nodes[i];
                    node.disk = node.old_copy.take().expect("checked");
                    if !trust {
                        node.inc = self.next_inc;
                        self.next_inc += 1;
                    }
                }
            }
            _ => {
                if let Some(i) = self.pick(false)
                    && self.disk_replaceable(i)
                {
                    self.stats.disks_replaced += 1;
                    let node = &mut self.nodes[i];
                    node.disk = MemStorage::default();
                    node.old_copy = None;
                    node.inc = self.next_inc;
                    self.next_inc += 1;
                }
            }
        }
        Ok(())
    }

    /// Backups: now and then, a copy of a node's disk as it is now.
    fn take_backup(&mut self) {
        if self.opts.w_restore == 0 || !self.rng.chance(0.3) {
            return;
        }
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        let node = &mut self.nodes[i];
        if node.disk.hard_state.incarnation == node.inc {
            node.old_copy = Some(node.disk.clone());
        }
    }

    /// A disk may be lost only when what it holds is elsewhere: its epoch is
    /// no newer than every other disk's, and every entry of its log is on
    /// every other disk (a single disk failure in an otherwise healthy
    /// cluster). The relaxed policy only asks the entries to be on one
    /// other disk.
    fn disk_replaceable(&self, i: usize) -> bool {
        let d = &self.nodes[i].disk;
        if d.hard_state.incarnation != self.nodes[i].inc {
            return false; // still a learner's blank disk
        }
        let last = disk_last(d);
        let mut holders = 0;
        for (j, other) in self.nodes.iter().enumerate() {
            if j == i {
                continue;
            }
            let od = &other.disk;
            let has = disk_version_at(od, last.seq).is_some_and(|v| v == last)
                || od
                    .snapshot
                    .as_ref()
                    .is_some_and(|s| s.version.seq >= last.seq);
            if od.hard_state.incarnation != other.inc {
                return false; // one disk failure at a time
            }
            if has {
                holders += 1;
            }
            if !self.opts.relaxed_disk_policy && (!has || od.hard_state.epoch < d.hard_state.epoch)
            {
                return false;
            }
        }
        holders >= 1
    }

    fn heal_all(&mut self) -> R<()> {
        self.chaos = false;
        self.heal_t = self.t;
        self.heal_links();
        self.loss = 0.0;
        self.dup = 0.0;
        self.long_delay = 0.0;
        for i in 0..self.nodes.len() {
            self.nodes[i].crash_armed = false;
            if !self.nodes[i].up {
                self.restart(i)?;
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // The end: convergence
    // ------------------------------------------------------------------

    fn converge(&mut self) -> R<()> {
        // Run quietly (no faults, no new writes) until identical or 5 s.
        let limit = self.t + 5000;
        let mut next_check = 0;
        loop {
            if self.t >= next_check {
                if self.converged() {
                    break;
                }
                next_check = self.t + 20;
            }
            let Some(item) = self.queue.pop() else { break };
            if item.t > limit {
                break;
            }
            self.t = item.t;
            match item.ev {
                Ev::Next { .. } | Ev::Read { .. } | Ev::Fault => {}
                ev => self.handle(ev)?,
            }
        }
        if !self.converged() {
            let dump = self.dump();
            return Err(self.fail(format!("no convergence:\n  {dump}")));
        }
        // Every acknowledged write is in every replica's state.
        for (rid, (ok, v)) in &self.ck.acked {
            for n in &self.nodes {
                if n.store.answer(rid) != Some((*ok, *v)) {
                    return Err(self.fail(format!(
                        "acknowledged write {rid} ({ok}, {v:?}) lost at node {}",
                        n.id
                    )));
                }
            }
        }
        // Exactly once: what was sold is what the applied request ids say.
        for n in &self.nodes {
            let bought = n
                .store
                .tables
                .answers
                .values()
                .filter(|(o, _)| matches!(o, Outcome::Bought { .. }))
                .count() as u64;
            let total: u64 = (0..self.opts.books)
                .map(|b| self.opts.stock.wrapping_sub(n.store.stock(b)))
                .sum();
            if bought != total {
                return Err(self.fail(format!(
                    "node {}: {bought} successful request ids but {total} books sold",
                    n.id
                )));
            }
            // identical logs: every entry up to the commit is the committed one
            let r = n.r.as_ref().unwrap();
            let commit = r.status().commit.seq;
            for e in r.log_entries() {
                if e.version.seq > commit {
                    break;
                }
                match self.ck.committed.get(&e.version.seq) {
                    Some((v, rid)) if *v == e.version && *rid == e.request_id => {}
                    other => {
                        return Err(self.fail(format!(
                            "node {} log at {:?} holds {}, committed {other:?}",
                            n.id, e.version, e.request_id
                        )));
                    }
                }
            }
        }
        self.stats.primaries = self.ck.primaries.len();
        Ok(())
    }

    fn dump(&self) -> String {
        let st: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match &n.r {
                None => format!("{}: down", n.id),
                Some(r) => {
                    let s = r.status();
                    format!(
                        "{}: {:?} learner={} epoch {} primary {:?} log_epoch {} last {:?} commit {:?} applied {:?} view {:?} transfer {:?}{}",
                        s.id, s.role, s.learner, s.epoch, s.primary, s.log_epoch, s.last, s.commit, n.store.last, s.view, s.transferring_to,
                        n.side.describe()
                    )
                }
            })
            .collect();
        st.join("\n  ")
    }

    fn trace(&self, what: &str) {
        if std::env::var_os("PYGMY_SIM_TRACE").is_some() {
            eprintln!("[{:>5}] {what}\n  {}", self.t, self.dump());
        }
    }

    fn converged(&self) -> bool {
        let first = &self.nodes[0];
        if !first.up {
            return false;
        }
        let r0 = first.r.as_ref().unwrap();
        if r0.status().commit.seq < first.store.last.seq {
            return false;
        }
        self.nodes.iter().all(|n| {
            n.up && n.store == first.store
                && n.r
                    .as_ref()
                    .is_some_and(|r| !r.is_learner() && r.status().last == r0.status().last)
        }) && self
            .nodes
            .iter()
            .any(|n| n.r.as_ref().is_some_and(|r| r.is_primary_ready()))
            && {
                // everyone has applied the primary's whole log
                let p = self
                    .nodes
                    .iter()
                    .find(|n| n.r.as_ref().is_some_and(|r| r.is_primary_ready()))
                    .unwrap();
                p.r.as_ref().unwrap().status().last.seq == first.store.last.seq
            }
    }
}

/// The simulator as the host of one node's driver loop: an in-memory disk,
/// the shipped state machine over [`MemTables`], and the checker watching
/// every entry applied.
struct SimHost<'a> {
    node: usize,
    disk: &'a mut MemStorage,
    synced: &'a mut MemStorage,
    unsynced_entries: bool,
    store: &'a mut Store,
    pending: &'a mut BTreeMap<u64, (usize, String)>,
    ck: &'a mut Checker,
    initial: u64,
    sw: machine::Switches,
    /// Crash right after persisting (before sending or answering anything).
    crash_armed: bool,
    crash_before_persist: bool,
    crashed: bool,
    defer_snapshots: bool,
    deferred_snapshot: &'a mut Option<(Version, Vec<u8>)>,
    out: Vec<(NodeId, Message)>,
    answers: Vec<(usize, Reply)>,
    snapshots_installed: usize,
}

impl SimHost<'_> {
    /// Applies one committed entry through the state machine; checks that
    /// entries apply in order without gaps, that no two replicas commit
    /// different entries at one seq, and that nothing is oversold.
    fn apply(&mut self, e: &Entry) -> Result<Option<(usize, Reply)>, String> {
        let seq = e.version.seq;
        let i = self.node;
        if seq <= self.store.last.seq {
            return Ok(None); // replay after restart: already in the snapshot
        }
        if seq != self.store.last.seq + 1 {
            return Err(format!(
                "node {} applies seq {seq} after {}",
                i + 1,
                self.store.last.seq
            ));
        }
        match self.ck.committed.get(&seq) {
            Some((v, rid)) if *v != e.version || *rid != e.request_id => {
                return Err(format!(
                    "divergence at seq {seq}: node {} commits {:?} {}, earlier {:?} {}",
                    i + 1,
                    e.version,
                    e.request_id,
                    v,
                    rid
                ));
            }
            Some(_) => {}
            None => {
                self.ck
                    .committed
                    .insert(seq, (e.version, e.request_id.clone()));
            }
        }
        self.store.last = e.version;
        if let EntryKind::Op(cmd) = &e.kind {
            let v = to_api(e.version);
            let Ok(answer) = machine::apply(&mut self.store.tables, &e.request_id, cmd, v, self.sw);
            if let Some((Outcome::Bought { book_id, .. }, first)) = answer
                && first == v
            {
                *self.store.sold.entry(book_id).or_default() += 1;
                // A sale changed the book (a retry's entry changes nothing).
                let b = book_id.get() as usize - 1;
                self.ck.book_writes.entry(b).or_default().insert(seq);
            }
            if let Ok(Command::Buy { book_id }) = serde_json::from_slice::<Command>(cmd) {
                let sold = self.store.sold.get(&book_id).copied().unwrap_or(0);
                let stock = self.store.tables.books[&book_id].stock;
                if stock > self.initial {
                    return Err(format!(
                        "oversell at node {}: book {book_id} stock {} sold {sold}",
                        i + 1,
                        stock as i64
                    ));
                }
                if self.initial - stock != sold {
                    return Err(format!(
                        "exactly once broken at node {}: book {book_id} stock down by {} but {sold} buys answered",
                        i + 1,
                        self.initial - stock
                    ));
                }
            }
        }
        if let Some((client, rid)) = self.pending.remove(&seq)
            && rid == e.request_id
        {
            let (ok, version) = self
                .store
                .answer(&rid)
                .expect("an applied request id has an answer");
            return Ok(Some((client, Reply::Ack { rid, ok, version })));
        }
        Ok(None)
    }
}

impl Host for SimHost<'_> {
    type Applied = (usize, Reply);
    type Error = String;

    fn persist_and_apply(&mut self, rd: &Ready) -> Result<Vec<(usize, Reply)>, String> {
        let crash = self.crash_armed
            && (!rd.messages.is_empty() || !rd.committed.is_empty() || !self.out.is_empty());
        if crash && self.crash_before_persist {
            // Down before its disk held the step: only what the step sent
            // first (a primary's appends) is out.
            self.crashed = true;
            return Ok(Vec::new());
        }
        self.disk.persist(rd);
        let sync = if self.unsynced_entries {
            rd.hard_state.is_some() || rd.snapshot_to_install.is_some()
        } else {
            rd.sync
        };
        if sync {
            // A synced write makes every write before it durable too.
            *self.synced = self.disk.clone();
        }
        if crash {
            self.crashed = true;
            return Ok(Vec::new());
        }
        if let Some(snap) = &rd.snapshot_to_install {
            self.snapshots_installed += 1;
            // Reassembled from chunks: the bytes must be the snapshot's.
            let store = Store::decode(&snap.data)?;
            if store.last != snap.version {
                return Err(format!(
                    "node {}: a snapshot installed as {:?} holds the state at {:?}",
                    self.node + 1,
                    snap.version,
                    store.last
                ));
            }
            *self.store = store;
            self.pending.clear();
        }
        let mut answers = Vec::new();
        for e in &rd.committed {
            answers.extend(self.apply(e)?);
        }
        if let Some(v) = rd.compacted {
            // The catalog's tables are its snapshot; this state machine
            // lives in memory, so the disk keeps its bytes at `v` instead
            // (durable with the next synced write, as the catalog's).
            if self.store.last != v {
                return Err(format!(
                    "node {}: compacted at {v:?} with the state at {:?}",
                    self.node + 1,
                    self.store.last
                ));
            }
            self.disk.compact(Snapshot {
                version: v,
                data: self.store.encode(),
            });
        }
        Ok(answers)
    }

    fn publish(&mut self, _replica: &Replica) {}

    fn send(&mut self, to: NodeId, msg: Message) {
        if !self.crashed {
            self.out.push((to, msg));
        }
    }

    fn answer(&mut self, applied: Vec<(usize, Reply)>) {
        if !self.crashed {
            self.answers.extend(applied);
        }
    }

    fn take_snapshot(&mut self) -> Result<Option<(Version, Vec<u8>)>, String> {
        let snapshot = (self.store.last, self.store.encode());
        if !self.defer_snapshots {
            return Ok(Some(snapshot));
        }
        if self.deferred_snapshot.is_none() {
            *self.deferred_snapshot = Some(snapshot);
        }
        Ok(None)
    }

    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        self.disk.compact(snapshot.clone());
        *self.synced = self.disk.clone();
        Ok(())
    }
}

fn disk_last(d: &MemStorage) -> Version {
    d.entries
        .last()
        .map(|e| e.version)
        .or(d.snapshot.as_ref().map(|s| s.version))
        .unwrap_or_default()
}

fn disk_version_at(d: &MemStorage, seq: u64) -> Option<Version> {
    let base = d
        .snapshot
        .as_ref()
        .map_or(Version::default(), |s| s.version);
    if seq == base.seq {
        return Some(base);
    }
    if seq < base.seq {
        return None;
    }
    d.entries
        .get((seq - base.seq - 1) as usize)
        .map(|e| e.version)
}

/// Run `count` schedules from `first_seed`; Err with the first failure.
pub fn run_many(first_seed: u64, count: u64, make: impl Fn(u64) -> Options) -> R<Stats> {
    let mut total = Stats::default();
    for seed in first_seed..first_seed + count {
        let s = Sim::new(seed, make(seed)).run()?;
        total.acked += s.acked;
        total.reads_served += s.reads_served;
        total.primaries += s.primaries;
        total.events += s.events;
        total.snapshots_installed += s.snapshots_installed;
        total.snapshot_chunks += s.snapshot_chunks;
        total.disks_replaced += s.disks_replaced;
        total.disks_restored += s.disks_restored;
        total.founded += s.founded;
        total.cache_hits += s.cache_hits;
        total.cache_grants += s.cache_grants;
        total.frontends_restarted += s.frontends_restarted;
        total.crashes += s.crashes;
        total.pauses += s.pauses;
    }
    Ok(total)
}

/// `PYGMY_SIM_SEED` replays one seed; `PYGMY_SIM_SCHEDULES` sets the count.
pub fn env_seed() -> Option<u64> {
    std::env::var("PYGMY_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
}

pub fn env_count(default: u64) -> u64 {
    std::env::var("PYGMY_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub fn env_offset() -> u64 {
    std::env::var("PYGMY_SIM_SEED_OFFSET")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
