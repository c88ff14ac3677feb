//! The load generator: namespace registration, population of the working
//! set, warm-up and the measured phase, over one of three data paths
//! ([`Mode`]): gRPC with inline payloads, shared-memory pools (`shm`), or Redis.
//!
//! Key ownership: key index `i` is written only by task `i % concurrency`, so
//! the writes of one key are serialized and the versions acknowledged for it
//! only grow. A read records the newest acknowledged version of each key
//! before it is sent and the newest issued version after it returns; the
//! version found must lie between the two.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvstrata_proto::v1::PutStatus;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::args::{BenchArgs, Mode, Plan};
use crate::connect::Target;
use crate::error::BenchError;
use crate::grpc_conn::{self, Client, open_clients, register_namespace};
use crate::payload::PayloadGen;
use crate::redis_conn::RedisConn;
use crate::report::{BenchReport, OpAccum, PopulateReport, gb_per_s};
use crate::shm::ShmConn;

/// State shared by every client task.
pub(crate) struct Shared {
    /// Empty in redis mode.
    pub(crate) namespace_id: Bytes,
    pub(crate) payloads: PayloadGen,
    /// Wire key of each working-set index: run id (u64 BE) then index (u64 BE).
    pub(crate) keys: Vec<Bytes>,
    /// Newest version sent in a put, per key.
    issued: Vec<AtomicU64>,
    /// Newest version acknowledged as stored, per key.
    acked: Vec<AtomicU64>,
    next_version: AtomicU64,
    /// Set when a task fails, so the others stop early.
    stop: AtomicBool,
    verify: bool,
    read_ratio: f64,
    batch: usize,
    concurrency: usize,
    run_id: u64,
}

impl Shared {
    /// The state of run `run_id` over the working set of `plan`, in
    /// namespace `namespace_id` (empty in redis mode).
    fn new(args: &BenchArgs, plan: &Plan, namespace_id: Bytes, run_id: u64) -> Self {
        Shared {
            namespace_id,
            payloads: PayloadGen::new(plan.block_size),
            keys: (0..plan.keys).map(|i| wire_key(run_id, i)).collect(),
            issued: (0..plan.keys).map(|_| AtomicU64::new(0)).collect(),
            acked: (0..plan.keys).map(|_| AtomicU64::new(0)).collect(),
            next_version: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            verify: !args.no_verify,
            read_ratio: args.read_ratio,
            batch: plan.batch,
            concurrency: plan.concurrency,
            run_id,
        }
    }

    fn key_count(&self) -> u64 {
        self.keys.len() as u64
    }

    pub(crate) fn key(&self, index: u64) -> Bytes {
        self.keys[index as usize].clone()
    }

    /// A fresh version for each key of a put, published as issued before the
    /// put is sent, so a reader never sees a version newer than `issued`.
    pub(crate) fn issue_versions(&self, indices: &[u64]) -> Vec<u64> {
        indices
            .iter()
            .map(|&i| {
                let v = self.next_version.fetch_add(1, Ordering::Relaxed);
                self.issued[i as usize].fetch_max(v, Ordering::SeqCst);
                v
            })
            .collect()
    }

    /// Oldest version each read may return: what was acknowledged before it was sent.
    pub(crate) fn read_floors(&self, indices: &[u64]) -> Vec<u64> {
        indices
            .iter()
            .map(|&i| self.acked[i as usize].load(Ordering::SeqCst))
            .collect()
    }

    /// Accounts the answer of a put: one status code per item, same order.
    pub(crate) fn put_outcome(
        &self,
        op: &'static str,
        indices: &[u64],
        versions: &[u64],
        latency: Duration,
        codes: &[i32],
    ) -> Result<Outcome, BenchError> {
        if codes.len() != indices.len() {
            return Err(BenchError::Protocol {
                op,
                reason: format!("{} results for {} items", codes.len(), indices.len()),
            });
        }
        let mut out = Outcome {
            latency,
            blocks: indices.len() as u64,
            bytes: (indices.len() * self.payloads.block_size()) as u64,
            ..Outcome::default()
        };
        for ((&i, &v), &code) in indices.iter().zip(versions).zip(codes) {
            match PutStatus::try_from(code) {
                Ok(PutStatus::Stored) => {
                    self.acked[i as usize].fetch_max(v, Ordering::SeqCst);
                    out.hits += 1;
                }
                Ok(PutStatus::NoSpace) => out.rejected += 1,
                _ => {
                    return Err(BenchError::Protocol {
                        op,
                        reason: format!("result code {code} for key #{i}"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Counts one found block of a read and checks its bytes: `key_ok` says
    /// whether the answer named the requested key, `floor` is the key's
    /// [`Shared::read_floors`] entry.
    pub(crate) fn check_hit(
        &self,
        out: &mut Outcome,
        i: u64,
        floor: u64,
        key_ok: bool,
        payload: &[u8],
    ) {
        out.hits += 1;
        out.bytes += payload.len() as u64;
        if !self.verify {
            return;
        }
        out.verified += 1;
        let checked = if !key_ok {
            Err(crate::payload::VerifyError::WrongResultKey)
        } else {
            let newest = self.issued[i as usize].load(Ordering::SeqCst);
            self.payloads.verify(payload, i, floor..=newest)
        };
        if let Err(e) = checked {
            out.failures += 1;
            if out.first_failure.is_none() {
                out.first_failure = Some(format!(
                    "key #{i} ({}): {e}",
                    hex::encode(&self.keys[i as usize])
                ));
            }
        }
    }
}

/// Number of working-set keys task `task` owns (writes).
fn owned_count(keys: u64, concurrency: usize, task: usize) -> u64 {
    let (c, t) = (concurrency as u64, task as u64);
    if t >= keys { 0 } else { (keys - t).div_ceil(c) }
}

/// The `n`-th key owned by `task`.
fn owned_key(concurrency: usize, task: usize, n: u64) -> u64 {
    task as u64 + n * concurrency as u64
}

/// Wire key of working-set index `index` in run `run_id`.
fn wire_key(run_id: u64, index: u64) -> Bytes {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&run_id.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    Bytes::from(k)
}

/// What one RPC did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) latency: Duration,
    pub(crate) blocks: u64,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) rejected: u64,
    pub(crate) bytes: u64,
    pub(crate) verified: u64,
    pub(crate) failures: u64,
    pub(crate) first_failure: Option<String>,
}

/// One client task's connection, per data path.
pub(crate) enum Conn {
    Grpc(Box<Client>),
    Shm(Box<ShmConn>),
    Redis(RedisConn),
}

impl Conn {
    async fn put_batch(&mut self, sh: &Shared, indices: &[u64]) -> Result<Outcome, BenchError> {
        match self {
            Conn::Grpc(c) => grpc_conn::put_batch(c, sh, indices).await,
            Conn::Shm(c) => c.put_batch(sh, indices).await,
            Conn::Redis(c) => c.put_batch(sh, indices).await,
        }
    }

    async fn get_batch(&mut self, sh: &Shared, indices: &[u64]) -> Result<Outcome, BenchError> {
        match self {
            Conn::Grpc(c) => grpc_conn::get_batch(c, sh, indices).await,
            Conn::Shm(c) => c.get_batch(sh, indices).await,
            Conn::Redis(c) => c.get_batch(sh, indices).await,
        }
    }
}

/// What one task gathered.
struct TaskResult {
    get: OpAccum,
    put: OpAccum,
    last_end: Option<Instant>,
    verified: u64,
    failures: u64,
    first_failure: Option<String>,
}

impl TaskResult {
    fn new() -> Result<Self, BenchError> {
        Ok(TaskResult {
            get: OpAccum::new()?,
            put: OpAccum::new()?,
            last_end: None,
            verified: 0,
            failures: 0,
            first_failure: None,
        })
    }

    fn note_verification(&mut self, out: &mut Outcome) {
        self.verified += out.verified;
        self.failures += out.failures;
        if self.first_failure.is_none() {
            self.first_failure = out.first_failure.take();
        }
    }
}

fn account(acc: &mut OpAccum, out: &Outcome) {
    acc.record_latency(out.latency);
    acc.blocks += out.blocks;
    acc.hits += out.hits;
    acc.misses += out.misses;
    acc.rejected += out.rejected;
    acc.bytes += out.bytes;
}

/// Writes every key task `task` owns once, in batches.
async fn populate_task(
    mut conn: Conn,
    sh: Arc<Shared>,
    task: usize,
    bar: ProgressBar,
) -> Result<(Outcome, Conn), BenchError> {
    let owned = owned_count(sh.key_count(), sh.concurrency, task);
    let mut total = Outcome::default();
    let mut n = 0;
    while n < owned {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let end = (n + sh.batch as u64).min(owned);
        let indices: Vec<u64> = (n..end)
            .map(|j| owned_key(sh.concurrency, task, j))
            .collect();
        let out = conn.put_batch(&sh, &indices).await?;
        total.blocks += out.blocks;
        total.rejected += out.rejected;
        total.bytes += out.bytes;
        bar.inc(out.blocks);
        n = end;
    }
    Ok((total, conn))
}

/// Issues RPCs until `deadline`; records those started at or after `measure_start`.
async fn load_task(
    mut conn: Conn,
    sh: Arc<Shared>,
    task: usize,
    measure_start: Instant,
    deadline: Instant,
) -> Result<TaskResult, BenchError> {
    let keys = sh.key_count();
    let owned = owned_count(keys, sh.concurrency, task);
    let mut rng =
        SmallRng::seed_from_u64(sh.run_id ^ (task as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut res = TaskResult::new()?;
    loop {
        let now = Instant::now();
        if now >= deadline || sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let measured = now >= measure_start;
        // A task that owns no key (fewer keys than tasks) only reads.
        let read = owned == 0 || rng.random_bool(sh.read_ratio);
        let (mut out, acc) = if read {
            let indices: Vec<u64> = rand::seq::index::sample(&mut rng, keys as usize, sh.batch)
                .into_iter()
                .map(|i| i as u64)
                .collect();
            (conn.get_batch(&sh, &indices).await?, &mut res.get)
        } else {
            let n = (sh.batch as u64).min(owned) as usize;
            let indices: Vec<u64> = rand::seq::index::sample(&mut rng, owned as usize, n)
                .into_iter()
                .map(|j| owned_key(sh.concurrency, task, j as u64))
                .collect();
            (conn.put_batch(&sh, &indices).await?, &mut res.put)
        };
        if measured {
            account(acc, &out);
            res.last_end = Some(Instant::now());
        }
        res.note_verification(&mut out);
    }
    Ok(res)
}

/// Runs the benchmark described by `args` against the daemon at `args.addr`
/// (or, with `--mode redis`, against the Redis server at `--redis-url`).
///
/// Returns [`BenchError::VerifyFailed`] (with the full report attached) when
/// any read returned wrong bytes.
pub async fn run(args: BenchArgs) -> Result<BenchReport, BenchError> {
    let plan = args.plan()?;
    // A fresh run id keeps this run's keys apart from earlier runs' blocks.
    let run_id: u64 = rand::random();
    let opened = open_conns(&args, &plan, run_id).await?;

    // The memcpy ceiling, before any load (the daemon is idle).
    let memcpy = if args.memcpy_duration.is_zero() {
        None
    } else {
        let (bs, d) = (plan.block_size, args.memcpy_duration);
        Some(tokio::task::spawn_blocking(move || crate::memcpy::measure(bs, d)).await?)
    };

    let sh = Arc::new(Shared::new(
        &args,
        &plan,
        opened.namespace_id.clone(),
        run_id,
    ));
    let (populate, conns) = populate(opened.conns, &sh, args.json).await?;
    let measured = measure(conns, &sh, &args).await?;

    let mut report = BenchReport {
        mode: args.mode.name().to_string(),
        transport: opened.transport,
        addr: opened.addr,
        mempool_socket: match args.mode {
            Mode::Shm => args.mempool_socket.clone(),
            _ => None,
        },
        namespace_id: hex::encode(&opened.namespace_id),
        block_size: plan.block_size as u64,
        batch: plan.batch,
        concurrency: plan.concurrency,
        connections: opened.connections,
        read_ratio: args.read_ratio,
        keys: plan.keys,
        warmup_s: args.warmup.as_secs_f64(),
        verify: !args.no_verify,
        populate,
        verified_blocks: measured.verified,
        verify_failures: measured.failures,
        first_failure: measured.first_failure.clone(),
        memcpy,
        ..BenchReport::default()
    };
    report.set_ops(&measured.get, &measured.put, measured.seconds);
    if measured.failures > 0 {
        return Err(BenchError::VerifyFailed {
            failures: measured.failures,
            first: measured.first_failure.unwrap_or_default(),
            report: Box::new(report),
        });
    }
    Ok(report)
}

/// Every task's connection, and what the report says about them.
struct Opened {
    conns: Vec<Conn>,
    /// The registered namespace; empty in redis mode.
    namespace_id: Bytes,
    transport: String,
    addr: String,
    /// Connections the tasks share (1 with `--shared-connection`).
    connections: usize,
}

/// Opens one connection per task over `args.mode`'s data path; for the
/// daemon's modes, registers the benchmark's namespace first.
async fn open_conns(args: &BenchArgs, plan: &Plan, run_id: u64) -> Result<Opened, BenchError> {
    match args.mode {
        Mode::Grpc | Mode::Shm => {
            let target = Target::parse(&args.addr)?;
            let mut clients = open_clients(args, plan.concurrency).await?;
            let namespace_id = register_namespace(&mut clients, plan).await?;
            let conns = if args.mode == Mode::Shm {
                let socket = args.mempool_socket.clone().unwrap_or_default();
                let mut conns = Vec::with_capacity(clients.len());
                for (task, c) in clients.into_iter().enumerate() {
                    let name = format!("kvstrata-bench-{run_id:016x}-{task}");
                    let shm = ShmConn::open(c, &socket, name, plan.block_size, plan.batch).await?;
                    conns.push(Conn::Shm(Box::new(shm)));
                }
                conns
            } else {
                clients
                    .into_iter()
                    .map(|c| Conn::Grpc(Box::new(c)))
                    .collect()
            };
            let connections = if args.shared_connection {
                1
            } else {
                plan.concurrency
            };
            Ok(Opened {
                conns,
                namespace_id,
                transport: target.transport().to_string(),
                addr: args.addr.clone(),
                connections,
            })
        }
        Mode::Redis => {
            let mut conns = Vec::with_capacity(plan.concurrency);
            for _ in 0..plan.concurrency {
                conns.push(Conn::Redis(RedisConn::open(&args.redis_url).await?));
            }
            Ok(Opened {
                conns,
                namespace_id: Bytes::new(),
                transport: crate::redis_conn::transport(&args.redis_url).to_string(),
                addr: args.redis_url.clone(),
                connections: plan.concurrency,
            })
        }
    }
}

/// Writes every key of the working set once (each task its own keys);
/// returns the population's report and the connections.
async fn populate(
    conns: Vec<Conn>,
    sh: &Arc<Shared>,
    hide_bar: bool,
) -> Result<(PopulateReport, Vec<Conn>), BenchError> {
    let bar = progress_bar(sh.key_count(), hide_bar);
    let t0 = Instant::now();
    let pop = join_all(
        conns
            .into_iter()
            .enumerate()
            .map(|(t, c)| populate_task(c, sh.clone(), t, bar.clone()))
            .collect(),
        sh.clone(),
    )
    .await;
    bar.finish_and_clear();
    let (pop, conns): (Vec<Outcome>, Vec<Conn>) = pop?.into_iter().unzip();
    let pop_secs = t0.elapsed().as_secs_f64();
    let report = PopulateReport {
        blocks: pop.iter().map(|o| o.blocks).sum(),
        rejected: pop.iter().map(|o| o.rejected).sum(),
        seconds: pop_secs,
        gb_per_s: gb_per_s(pop.iter().map(|o| o.bytes).sum(), pop_secs),
    };
    Ok((report, conns))
}

/// What the measured phase gathered, over every task.
struct Measured {
    get: OpAccum,
    put: OpAccum,
    /// From the start of the measured phase to the end of its last RPC.
    seconds: f64,
    verified: u64,
    failures: u64,
    first_failure: Option<String>,
}

/// Runs the warm-up (`args.warmup`) and then the measured phase
/// (`args.duration`) on every connection, and merges what the tasks
/// recorded.
async fn measure(
    conns: Vec<Conn>,
    sh: &Arc<Shared>,
    args: &BenchArgs,
) -> Result<Measured, BenchError> {
    let measure_start = Instant::now() + args.warmup;
    let deadline = measure_start + args.duration;
    let results = join_all(
        conns
            .into_iter()
            .enumerate()
            .map(|(t, c)| load_task(c, sh.clone(), t, measure_start, deadline))
            .collect(),
        sh.clone(),
    )
    .await?;

    let mut get = OpAccum::new()?;
    let mut put = OpAccum::new()?;
    let mut last_end = None::<Instant>;
    let (mut verified, mut failures, mut first_failure) = (0, 0, None);
    for r in &results {
        get.merge(&r.get)?;
        put.merge(&r.put)?;
        last_end = last_end.max(r.last_end);
        verified += r.verified;
        failures += r.failures;
        if first_failure.is_none() {
            first_failure.clone_from(&r.first_failure);
        }
    }
    let seconds = match last_end {
        Some(end) => end.saturating_duration_since(measure_start).as_secs_f64(),
        None => args.duration.as_secs_f64(),
    };
    Ok(Measured {
        get,
        put,
        seconds,
        verified,
        failures,
        first_failure,
    })
}

/// Spawns one future per task, stops the others as soon as one fails, and
/// returns every result or the first error.
async fn join_all<T, F>(futures: Vec<F>, stop: Arc<Shared>) -> Result<Vec<T>, BenchError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, BenchError>> + Send + 'static,
{
    let handles: Vec<_> = futures
        .into_iter()
        .map(|f| {
            let sh = stop.clone();
            tokio::spawn(async move {
                let r = f.await;
                if r.is_err() {
                    sh.stop.store(true, Ordering::Relaxed);
                }
                r
            })
        })
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    let mut first_err = None;
    for h in handles {
        match h.await {
            Ok(Ok(v)) => results.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(BenchError::Task(e));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

fn progress_bar(len: u64, hidden: bool) -> ProgressBar {
    if hidden || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "populating {bar:40.cyan/blue} {pos}/{len} blocks ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_exactly_one_owner() {
        for (keys, conc) in [(10u64, 4usize), (4, 4), (3, 4), (1, 1), (4096, 3)] {
            let mut seen = vec![0u32; keys as usize];
            for t in 0..conc {
                for n in 0..owned_count(keys, conc, t) {
                    let k = owned_key(conc, t, n);
                    assert_eq!(k as usize % conc, t);
                    seen[k as usize] += 1;
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "keys {keys} conc {conc}: {seen:?}"
            );
        }
        assert_eq!(owned_count(3, 4, 3), 0);
    }

    #[test]
    fn wire_keys_are_distinct_per_run_and_index() {
        assert_eq!(wire_key(1, 2).len(), 16);
        assert_ne!(wire_key(1, 2), wire_key(1, 3));
        assert_ne!(wire_key(1, 2), wire_key(2, 2));
    }
}
