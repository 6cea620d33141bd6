//! Data-parallel training on Burn's collective engine (burn-collective): one replica of the
//! model per device, each on its share of the global batch. Gradients are summed across the
//! replicas before clipping and the optimizer step, so every replica takes the update one
//! device would take on the whole batch, and the replicas stay equal.
//!
//! Replicas are threads of one process (`devices`: one per local device; CPU replicas share
//! the CPU), processes (`nodes`), or both. A replica's global rank is
//! `node_rank × devices + local index`; rank 0 writes checkpoints, metrics and `final/`.
//!
//! - Between the replicas of a process: burn-collective's local all-reduce (a tree).
//! - Between processes: burn-collective 0.21's global all-reduce cannot run twice (its sync
//!   step keeps the peers of the first operation: `SyncService::sync` clears a copy of its
//!   list, so every later operation waits for ever), and re-registering for each operation
//!   races in its orchestrator. So the processes meet over Burn's own transport,
//!   burn-communication's websockets, in a star: every node links to node 0 at
//!   `coordinator`; node 0 sums the nodes' values in node order and sends the sum back.
//!   With several devices per node, the node's sum goes out from its first replica and comes
//!   back to the others through burn-collective's local broadcast.
//!
//! burn-collective's operations block until every replica has called them and have no
//! timeout: a replica that died would leave the others waiting for ever. Each replica has a
//! watchdog: an operation still waiting past `timeout_s` ends the process with an error
//! naming it. A replica thread that fails cancels the operations the others wait in; a node
//! that dies breaks its link, and the others fail at once with an error naming it.

use std::any::TypeId;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use align_model::burn::collective::{
    AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation, all_reduce, broadcast,
    finish_collective, register, reset_collective,
};
use align_model::burn::tensor::backend::Backend;
use align_model::burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use anyhow::{Context, Result, anyhow, bail};
use burn_communication::websocket::{WsClient, WsClientChannel, WsServer, WsServerChannel};
use burn_communication::{CommunicationChannel, Message, ProtocolClient, ProtocolServer};
use serde::{Deserialize, Serialize};

/// `[distributed]`: how many replicas train, and where they meet. The CLI's `--devices`,
/// `--nodes`, `--node-rank`, `--coordinator` and `--node-address` override it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedConfig {
    /// Replicas in this process, one per device (`cuda:0..N`; on the CPU, threads sharing
    /// it). Default 1.
    #[serde(default = "one")]
    pub devices: usize,
    /// Processes (nodes) taking part, each with `devices` replicas. Default 1.
    #[serde(default = "one")]
    pub nodes: usize,
    /// This process's index among the nodes, 0 to `nodes − 1`. Default 0.
    #[serde(default)]
    pub node_rank: usize,
    /// `host:port` of node 0, where the other nodes connect (needed when `nodes` > 1; node 0
    /// listens on the port on every interface).
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Seconds a collective operation waits for the other replicas before the run fails
    /// (rank 0's evaluations and checkpoints happen while the others wait). Default 600.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
}

fn one() -> usize {
    1
}

fn default_timeout() -> f64 {
    600.0
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig { devices: 1, nodes: 1, node_rank: 0, coordinator: None, timeout_s: default_timeout() }
    }
}

impl DistributedConfig {
    /// Replicas in the whole run.
    pub fn world(&self) -> usize {
        self.devices * self.nodes
    }

    pub fn validate(&self) -> Result<()> {
        if self.devices == 0 {
            bail!("[distributed] devices: must be at least 1, found 0");
        }
        if self.nodes == 0 {
            bail!("[distributed] nodes: must be at least 1, found 0");
        }
        if self.node_rank >= self.nodes {
            bail!("[distributed] node_rank: {} is not below nodes = {}", self.node_rank, self.nodes);
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            bail!("[distributed] timeout_s: must be a positive number of seconds, found {}", self.timeout_s);
        }
        if self.nodes > 1 {
            let c = self
                .coordinator
                .as_deref()
                .context("[distributed] coordinator: needed when nodes > 1 (host:port of node 0)")?;
            host_port(c).context("[distributed] coordinator")?;
        }
        Ok(())
    }
}

/// `host:port` split, the port checked.
fn host_port(s: &str) -> Result<(String, u16)> {
    let s = s.trim_start_matches("ws://");
    let (host, port) = s.rsplit_once(':').with_context(|| format!("`{s}` is not host:port"))?;
    if host.is_empty() {
        bail!("`{s}` has no host");
    }
    let port = port.parse::<u16>().with_context(|| format!("`{s}`: `{port}` is not a port number"))?;
    Ok((host.to_string(), port))
}

/// Who this replica is in the run, and its link to the others. A single-device run is rank
/// 0 of 1 with no link, and every operation is the identity.
#[derive(Clone)]
pub struct Replica {
    pub rank: usize,
    pub world: usize,
    group: Option<Arc<Group>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replica {{ rank: {}, world: {} }}", self.rank, self.world)
    }
}

/// A replica's links to the others.
struct Group {
    peer: PeerId,
    /// burn-collective's settings when this process has several replicas.
    local: Option<CollectiveConfig>,
    /// The link to the other nodes, held by each node's first replica.
    star: Option<Arc<Star>>,
    nodes: usize,
    /// The backend this replica registered with (several replicas per process).
    joined: Mutex<Option<Joined>>,
    /// The operation in flight and since when, for the watchdog.
    in_flight: Arc<Mutex<Option<(Instant, String)>>>,
}

/// The backend a replica joined burn-collective with, and that backend's functions for
/// cancelling pending operations (a failed replica thread unblocks the others) and leaving.
struct Joined {
    backend: TypeId,
    reset: fn(),
    finish: fn(PeerId) -> Result<(), CollectiveError>,
}

thread_local! {
    static CURRENT: RefCell<Replica> = RefCell::new(Replica::single());
}

impl Replica {
    /// The replica of a single-device run.
    pub fn single() -> Self {
        Replica { rank: 0, world: 1, group: None }
    }

    /// The replica this thread runs as (set by [`launch`]; a single-device run otherwise).
    pub fn current() -> Self {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Rank 0 writes what the run leaves (checkpoints, metrics, `final/`).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The seed of this replica's random draws (dropout) from the run's: the run's own on
    /// rank 0, so a single-device run draws as before.
    pub fn seed(&self, run_seed: u64) -> u64 {
        if self.rank == 0 {
            run_seed
        } else {
            align_model::SplitMix64::new(run_seed ^ (self.rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
        }
    }

    /// Joins burn-collective for backend `B` on `device` (once; later calls check the
    /// backend). Only replicas sharing a process join it.
    pub fn join<B: Backend>(&self, device: &B::Device) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let Some(config) = &g.local else { return Ok(()) };
        let mut joined = g.joined.lock().map_err(|_| anyhow!("replica state poisoned"))?;
        match &*joined {
            Some(j) if j.backend == TypeId::of::<B>() => return Ok(()),
            Some(_) => bail!("a replica joins the collective with one backend only"),
            None => {}
        }
        self.guarded("joining the other replicas", || {
            register::<B>(g.peer, device.clone(), config.clone()).map_err(|e| self.collective_error(e))
        })?;
        *joined =
            Some(Joined { backend: TypeId::of::<B>(), reset: reset_collective::<B>, finish: finish_collective::<B> });
        Ok(())
    }

    /// The element-wise sum of `t` over the replicas, bit for bit the same on each (f32 on
    /// the wire: bf16 values are widened first and narrowed back).
    pub fn sum<B: Backend>(&self, t: Tensor<B, 1>, what: &str) -> Result<Tensor<B, 1>> {
        let Some(g) = &self.group else { return Ok(t) };
        let device = t.device();
        self.join::<B>(&device)?;
        let dtype = t.dtype();
        let mut x = if dtype == DType::F32 { t } else { t.cast(DType::F32) };
        if g.local.is_some() {
            let summed = self.guarded(what, || {
                all_reduce::<B>(g.peer, x.into_primitive().tensor(), ReduceOperation::Sum)
                    .map_err(|e| self.collective_error(e))
            })?;
            x = Tensor::from_primitive(TensorPrimitive::Float(summed));
        }
        if g.nodes > 1 {
            let mut across = None;
            if let Some(star) = &g.star {
                let host = x.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow!("{e:?}"))?;
                let n = host.len();
                let summed = self
                    .guarded(what, || star.all_reduce(host).with_context(|| format!("rank {}: {what}", self.rank)))?;
                across = Some(Tensor::<B, 1>::from_data(TensorData::new(summed, [n]), &device));
            }
            x = match (&g.local, across) {
                (Some(_), across) => {
                    let got = self.guarded(what, || {
                        broadcast::<B>(g.peer, across.map(|t| t.into_primitive().tensor()))
                            .map_err(|e| self.collective_error(e))
                    })?;
                    Tensor::from_primitive(TensorPrimitive::Float(got))
                }
                (None, Some(t)) => t,
                (None, None) => bail!("rank {}: {what}: no link to the other nodes", self.rank),
            };
        }
        Ok(if dtype == DType::F32 { x } else { x.cast(dtype) })
    }

    /// Every replica's `local` values, by rank, bit for bit (each f64 travels as four 16-bit
    /// pieces, which f32 sums with zeros carry exactly). Replicas may send different lengths.
    pub fn gather<B: Backend>(&self, device: &B::Device, local: &[f64], what: &str) -> Result<Vec<Vec<f64>>> {
        if self.group.is_none() {
            return Ok(vec![local.to_vec()]);
        }
        let lengths = self.gather_fixed::<B>(device, &[local.len() as f64], what)?;
        let longest = lengths.iter().map(|l| l[0] as usize).max().unwrap_or(0);
        let mut padded = local.to_vec();
        padded.resize(longest, 0.0);
        let all = self.gather_fixed::<B>(device, &padded, what)?;
        Ok(all
            .into_iter()
            .zip(&lengths)
            .map(|(mut v, l)| {
                v.truncate(l[0] as usize);
                v
            })
            .collect())
    }

    /// Every replica's `rows` (of any lengths), concatenated in rank order, bit for bit.
    pub fn gather_rows<B: Backend>(&self, device: &B::Device, rows: &[Vec<f64>], what: &str) -> Result<Vec<Vec<f64>>> {
        if self.group.is_none() {
            return Ok(rows.to_vec());
        }
        let mut flat = Vec::with_capacity(1 + rows.iter().map(|r| r.len() + 1).sum::<usize>());
        flat.push(rows.len() as f64);
        for r in rows {
            flat.push(r.len() as f64);
            flat.extend(r);
        }
        let mut out = vec![];
        for (rank, v) in self.gather::<B>(device, &flat, what)?.into_iter().enumerate() {
            let mut at = 1;
            for _ in 0..v.first().copied().unwrap_or(0.0) as usize {
                let len = *v.get(at).with_context(|| format!("{what}: rank {rank} sent a cut row"))? as usize;
                let row = v.get(at + 1..at + 1 + len).with_context(|| format!("{what}: rank {rank} sent a cut row"))?;
                out.push(row.to_vec());
                at += 1 + len;
            }
        }
        Ok(out)
    }

    /// [`Replica::gather`] of one length on every replica (one all-reduce, not two).
    pub fn gather_fixed<B: Backend>(&self, device: &B::Device, local: &[f64], what: &str) -> Result<Vec<Vec<f64>>> {
        let k = local.len();
        let mut slots = vec![0f32; (self.world * k * 4).max(1)];
        for (i, x) in local.iter().enumerate() {
            let bits = x.to_bits();
            for p in 0..4 {
                slots[(self.rank * k + i) * 4 + p] = ((bits >> (16 * p)) & 0xFFFF) as f32;
            }
        }
        let n = slots.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(slots, [n]), device);
        let summed = self.sum(t, what)?.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| anyhow!("{e:?}"))?;
        Ok((0..self.world)
            .map(|r| {
                (0..k)
                    .map(|i| {
                        let piece = |p: usize| (summed[(r * k + i) * 4 + p] as u64) << (16 * p);
                        f64::from_bits((0..4).fold(0u64, |acc, p| acc | piece(p)))
                    })
                    .collect()
            })
            .collect())
    }

    fn collective_error(&self, e: CollectiveError) -> anyhow::Error {
        match e {
            CollectiveError::LocalServerMissing => anyhow!("rank {}: {OTHER_FAILED} (see its error)", self.rank),
            e => anyhow!("rank {}: the collective operation failed: {e:?}", self.rank),
        }
    }

    /// Run a blocking operation with the watchdog watching.
    fn guarded<T>(&self, what: &str, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(g) = &self.group else { return op() };
        if let Ok(mut slot) = g.in_flight.lock() {
            *slot = Some((Instant::now(), what.to_string()));
        }
        let out = op();
        if let Ok(mut slot) = g.in_flight.lock() {
            *slot = None;
        }
        out.with_context(|| what.to_string())
    }

    /// Cancel the operations other replicas of this process wait in (a replica failed).
    fn cancel(&self) {
        if let Some(g) = &self.group
            && let Ok(joined) = g.joined.lock()
            && let Some(j) = &*joined
        {
            (j.reset)();
        }
    }

    /// Leave burn-collective at the end of a run (its next run registers afresh).
    fn finish(&self) {
        if let Some(g) = &self.group
            && let Ok(joined) = g.joined.lock()
            && let Some(j) = &*joined
            && let Err(e) = (j.finish)(g.peer)
        {
            tracing::debug!(rank = self.rank, "leaving the collective: {e:?}");
        }
    }
}

/// What a replica reports when it stops because another failed.
const OTHER_FAILED: &str = "another replica failed";

/// Run `body` as each replica of this process, the i-th on `devices[i]` (its own thread when
/// there are several), and return the first replica's result. `tag` names the run (its
/// output directory): nodes of different runs refuse each other. A single-device run calls
/// `body` once, here. An error of any replica fails the whole run with that error.
pub fn launch<D: Sync, T: Send>(
    cfg: &DistributedConfig,
    tag: &str,
    devices: &[D],
    body: impl Fn(&D) -> Result<T> + Sync,
) -> Result<T> {
    cfg.validate()?;
    if devices.len() != cfg.devices {
        bail!("[distributed] devices = {}, but {} devices were opened", cfg.devices, devices.len());
    }
    if cfg.world() == 1 {
        return body(&devices[0]);
    }
    tracing::info!(
        world = cfg.world(),
        nodes = cfg.nodes,
        devices = cfg.devices,
        node_rank = cfg.node_rank,
        "data-parallel run"
    );
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    let star = if cfg.nodes > 1 { Some(Arc::new(Star::connect(cfg, tag, timeout)?)) } else { None };
    let local = (cfg.devices > 1).then(|| {
        CollectiveConfig::default()
            .with_num_devices(cfg.devices)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2))
    });
    let replicas: Vec<Replica> = (0..cfg.devices)
        .map(|i| {
            let rank = cfg.node_rank * cfg.devices + i;
            let in_flight = Arc::new(Mutex::new(None));
            // Past the node links' own timeout, which fails an operation cleanly first.
            watchdog(rank, timeout + Duration::from_secs(10), Arc::downgrade(&in_flight));
            let group = Group {
                peer: PeerId::from(rank),
                local: local.clone(),
                star: if i == 0 { star.clone() } else { None },
                nodes: cfg.nodes,
                joined: Mutex::new(None),
                in_flight,
            };
            Replica { rank, world: cfg.world(), group: Some(Arc::new(group)) }
        })
        .collect();
    let run = |replica: &Replica, device: &D| -> Result<T> {
        let span = tracing::info_span!("replica", rank = replica.rank);
        let _entered = span.enter();
        CURRENT.with(|c| *c.borrow_mut() = replica.clone());
        // A panic is this replica's failure too: the others must not wait for it.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(device))).unwrap_or_else(|p| {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            Err(anyhow!("rank {}: the replica panicked: {}", replica.rank, what.unwrap_or_default()))
        });
        CURRENT.with(|c| *c.borrow_mut() = Replica::single());
        match &out {
            Ok(_) => replica.finish(),
            Err(_) => replica.cancel(),
        }
        out
    };
    let results: Vec<Result<T>> = if replicas.len() == 1 {
        vec![run(&replicas[0], &devices[0])]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .iter()
                .zip(devices)
                .map(|(r, d)| {
                    let run = &run;
                    std::thread::Builder::new().name(format!("replica-{}", r.rank)).spawn_scoped(s, move || run(r, d))
                })
                .collect();
            handles
                .into_iter()
                .zip(&replicas)
                .map(|(h, r)| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| Err(anyhow!("rank {}: the replica thread panicked", r.rank))),
                    Err(e) => Err(anyhow!("rank {}: starting the replica thread: {e}", r.rank)),
                })
                .collect()
        })
    };
    // Report the error that caused the others' "another replica failed".
    let mut errors: Vec<anyhow::Error> = vec![];
    let mut first_ok = None;
    for r in results {
        match r {
            Ok(v) => {
                first_ok.get_or_insert(v);
            }
            Err(e) => errors.push(e),
        }
    }
    let cause = errors.iter().position(|e| !format!("{e:#}").contains(OTHER_FAILED)).unwrap_or(0);
    match (errors.into_iter().nth(cause), first_ok) {
        (Some(e), _) => Err(e),
        (None, Some(v)) => Ok(v),
        (None, None) => bail!("no replica ran"),
    }
}

/// Ends the process when an operation of replica `rank` waits longer than `timeout`: the
/// operation cannot be cancelled, and the replica it waits for is gone or stuck.
fn watchdog(rank: usize, timeout: Duration, in_flight: Weak<Mutex<Option<(Instant, String)>>>) {
    let spawned = std::thread::Builder::new().name(format!("watchdog-{rank}")).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let Some(slot) = in_flight.upgrade() else { return };
            let late = slot.lock().ok().and_then(|s| s.as_ref().filter(|(t, _)| t.elapsed() > timeout).cloned());
            if let Some((since, what)) = late {
                let msg = format!(
                    "rank {rank}: {what}: the other replicas did not take part within {:.0} s ([distributed] timeout_s): \
                     a replica died or is stuck; the run stops (resume every replica with --resume)",
                    since.elapsed().as_secs_f64()
                );
                tracing::error!("{msg}");
                eprintln!("error: {msg}");
                std::process::exit(3);
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(rank, "no watchdog for the collective operations: {e}");
    }
}

/// The links between the nodes of a run: node 0 (the hub) listens at the coordinator's port,
/// every other node connects to it, and an all-reduce sends each node's values to the hub,
/// which sums them in node order and sends the one sum back to all.
struct Star {
    node: usize,
    timeout: Duration,
    runtime: tokio::runtime::Runtime,
    links: tokio::sync::Mutex<Links>,
    ops: std::sync::atomic::AtomicU64,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

enum Links {
    /// The hub's link to node `i + 1`.
    Hub(Vec<WsServerChannel>),
    Spoke(Box<WsClientChannel>),
}

/// What a node says when it joins: who it is and which run it belongs to.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Hello {
    node: usize,
    nodes: usize,
    devices: usize,
    tag: String,
}

const ROUTE: &str = "align-data-parallel";

impl Star {
    /// Link this node to the others; returns once every node has joined (a barrier).
    fn connect(cfg: &DistributedConfig, tag: &str, timeout: Duration) -> Result<Star> {
        let coordinator = cfg.coordinator.as_deref().unwrap_or_default();
        let (host, port) = host_port(coordinator).context("[distributed] coordinator")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("align-node-link")
            .enable_all()
            .build()
            .context("starting the node link's runtime")?;
        let me = Hello { node: cfg.node_rank, nodes: cfg.nodes, devices: cfg.devices, tag: tag.to_string() };
        let deadline = tokio::time::Instant::now() + timeout;
        let (links, stop) = if cfg.node_rank == 0 {
            // Bind-test first: the server's own bind error only reaches a log.
            std::net::TcpListener::bind(("0.0.0.0", port))
                .with_context(|| format!("[distributed] coordinator: node 0 cannot listen on port {port}"))?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<WsServerChannel>();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = WsServer::new(port)
                .route(ROUTE, move |channel| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(channel);
                    }
                })
                .serve(async {
                    let _ = stopped.await;
                });
            runtime.spawn(async move {
                if let Err(e) = server.await {
                    tracing::error!("the node link server stopped: {e:?}");
                }
            });
            let peers = runtime.block_on(accept_nodes(rx, &me, deadline, timeout))?;
            (Links::Hub(peers), Some(stop))
        } else {
            let address = format!("ws://{host}:{port}");
            let hub = runtime.block_on(join_hub(&address, &me, deadline, timeout))?;
            (Links::Spoke(Box::new(hub)), None)
        };
        tracing::info!(node = cfg.node_rank, nodes = cfg.nodes, coordinator, "nodes linked");
        Ok(Star {
            node: cfg.node_rank,
            timeout,
            runtime,
            links: tokio::sync::Mutex::new(links),
            ops: std::sync::atomic::AtomicU64::new(0),
            stop: Mutex::new(stop),
        })
    }

    /// The sum over the nodes of `values` (the same length on every node).
    fn all_reduce(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        let op = self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = self.timeout;
        self.runtime.block_on(async {
            let mut links = self.links.lock().await;
            match &mut *links {
                Links::Spoke(hub) => {
                    within(timeout, hub.send(Message::new(encode(op, &values)))).await?.map_err(|e| {
                        anyhow!("node {}: node 0 left the run (sending to it failed: {e:?})", self.node)
                    })?;
                    let reply = receive(hub.as_mut(), timeout).await.map_err(|e| anyhow!("node 0 {e}"))?;
                    decode(&reply, op, values.len()).context("node 0's sum")
                }
                Links::Hub(peers) => {
                    let mut sum = values;
                    for (i, peer) in peers.iter_mut().enumerate() {
                        let got = receive(peer, timeout).await.map_err(|e| anyhow!("node {} {e}", i + 1))?;
                        let got = decode(&got, op, sum.len()).with_context(|| format!("node {}'s values", i + 1))?;
                        for (s, v) in sum.iter_mut().zip(got) {
                            *s += v;
                        }
                    }
                    let reply = encode(op, &sum);
                    for (i, peer) in peers.iter_mut().enumerate() {
                        within(timeout, peer.send(Message::new(reply.clone())))
                            .await?
                            .map_err(|e| anyhow!("node {} left the run (sending to it failed: {e:?})", i + 1))?;
                    }
                    Ok(sum)
                }
            }
        })
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        if let Ok(mut stop) = self.stop.lock()
            && let Some(stop) = stop.take()
        {
            let _ = stop.send(());
        }
        let links = self.links.get_mut();
        self.runtime.block_on(async {
            let close = async {
                match links {
                    Links::Spoke(hub) => {
                        let _ = hub.close().await;
                    }
                    Links::Hub(peers) => {
                        for p in peers {
                            let _ = p.close().await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
        });
    }
}

/// Node 0: the hellos of nodes 1..N, checked, then "ok" to each (everyone has joined).
async fn accept_nodes(
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<WsServerChannel>,
    me: &Hello,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<Vec<WsServerChannel>> {
    let mut peers: Vec<Option<WsServerChannel>> = (1..me.nodes).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let joined = peers.iter().filter(|p| p.is_some()).count() + 1;
        let mut channel = tokio::time::timeout_at(deadline, incoming.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "node 0: {joined} of {} nodes joined within {:.0} s ([distributed] timeout_s); \
                     start every node with the same coordinator",
                    me.nodes,
                    timeout.as_secs_f64()
                )
            })?
            .context("node 0: the link server stopped")?;
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, channel.recv()).await.unwrap_or(Ok(None)) else {
            continue;
        };
        let refuse = match serde_json::from_slice::<Hello>(&msg.data) {
            Err(e) => Some(format!("not a node of align ({e})")),
            Ok(h) if (h.nodes, h.devices, &h.tag) != (me.nodes, me.devices, &me.tag) => Some(format!(
                "node {} has nodes = {}, devices = {} for `{}`; node 0 has nodes = {}, devices = {} for `{}`",
                h.node, h.nodes, h.devices, h.tag, me.nodes, me.devices, me.tag
            )),
            Ok(h) if h.node == 0 || h.node >= me.nodes => {
                Some(format!("node_rank {} is not in 1..{}", h.node, me.nodes))
            }
            Ok(h) if peers[h.node - 1].is_some() => Some(format!("two nodes have node_rank {}", h.node)),
            Ok(h) => {
                peers[h.node - 1] = Some(channel);
                tracing::info!(node = h.node, "node joined");
                continue;
            }
        };
        let refuse = refuse.unwrap_or_default();
        tracing::warn!("node 0 refused a node: {refuse}");
        let _ = channel.send(Message::new(format!("refused: {refuse}").into_bytes().into())).await;
    }
    let mut peers: Vec<WsServerChannel> = peers.into_iter().flatten().collect();
    for (i, p) in peers.iter_mut().enumerate() {
        within(timeout, p.send(Message::new(b"ok".to_vec().into())))
            .await?
            .map_err(|e| anyhow!("node {} left while the run started ({e:?})", i + 1))?;
    }
    Ok(peers)
}

/// Nodes 1..N: connect to node 0 (retrying until it listens), say hello, and wait for
/// everyone to have joined.
async fn join_hub(
    address: &str,
    me: &Hello,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<WsClientChannel> {
    let hello = serde_json::to_vec(me)?;
    loop {
        let parsed = address.parse().map_err(|e: String| anyhow!(e))?;
        if let Some(mut hub) = WsClient::connect(parsed, ROUTE).await
            && hub.send(Message::new(hello.clone().into())).await.is_ok()
        {
            match tokio::time::timeout_at(deadline, hub.recv()).await {
                Ok(Ok(Some(m))) if &m.data[..] == b"ok" => return Ok(hub),
                Ok(Ok(Some(m))) => bail!("node {}: node 0 at {address} {}", me.node, String::from_utf8_lossy(&m.data)),
                // A hub of an earlier stage closing: try again.
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "node {}: node 0 did not start the run at {address} within {:.0} s ([distributed] timeout_s)",
        me.node,
        timeout.as_secs_f64()
    )
}

/// A message of the node links: the operation's number, the count, then little-endian f32s.
fn encode(op: u64, values: &[f32]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(16 + 4 * values.len());
    out.extend_from_slice(&op.to_le_bytes());
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.into()
}

fn decode(msg: &[u8], op: u64, len: usize) -> Result<Vec<f32>> {
    let field = |at: usize| msg.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let (Some(got_op), Some(got_len)) = (field(0), field(8)) else { bail!("a message of {} bytes", msg.len()) };
    if got_op != op || got_len as usize != len || msg.len() != 16 + 4 * len {
        bail!(
            "operation {got_op} with {got_len} values, where operation {op} with {len} was due: the nodes do not run the same steps"
        );
    }
    Ok(msg[16..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// `fut` within `timeout`, or an error saying which wait ran out.
async fn within<T>(timeout: Duration, fut: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("no answer within {:.0} s ([distributed] timeout_s)", timeout.as_secs_f64()))
}

/// The next message on a link, or why there is none.
async fn receive<C: CommunicationChannel>(link: &mut C, timeout: Duration) -> Result<bytes::Bytes, String> {
    match tokio::time::timeout(timeout, link.recv()).await {
        Err(_) => Err(format!(
            "sent nothing within {:.0} s ([distributed] timeout_s): it is stuck or gone",
            timeout.as_secs_f64()
        )),
        Ok(Ok(Some(m))) => Ok(m.data),
        Ok(Ok(None)) => Err("left the run (its link closed)".into()),
        Ok(Err(e)) => Err(format!("left the run: its process ended or its link broke ({e:?})")),
    }
}
