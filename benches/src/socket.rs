//! The loopback socket ceiling (`kvstrata bench socket`): how many bytes per
//! second `--connections` connections carry over loopback TCP or a Unix socket
//! on this machine when nothing but the kernel touches the bytes.
//!
//! Each connection is one sender thread that writes `--write-size` blocks
//! picked at random from a `--working-set` buffer (default 1 GiB, the load
//! generator's working set: a server of that much data reads it from DRAM;
//! `0` means one block, which stays in the CPU's caches) and one receiver
//! thread that reads into one buffer and drops what it read: no protocol, no
//! requests, no verification, no allocation. The sockets get the options the daemon and its clients use (`kvstrata_types::sockets`): the
//! accepting side sends, as the daemon does a GET's answers, with Nagle off
//! and, over loopback TCP, the daemon's congestion controller; Unix sockets
//! get the raised buffers on both sides. What a GET of the same bytes moves
//! over the same transport can only be less, whichever server answers it, so
//! `benches/loopback.sh` reports kvstrata and Redis as fractions of this.
//!
//! GB/s counts the bytes the receivers read between the end of `--warmup` and
//! the end of `--duration` (decimal). The report also gives the CPU time of
//! the process in that span (both ends are threads of this process), so a
//! reader sees whether the ceiling is the CPUs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use kvstrata_types::sockets;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;

use crate::error::BenchError;
use crate::report::process_cpu;

/// Most connections one run opens (two threads each).
pub const MAX_CONNECTIONS: usize = 1024;
/// Largest write (and read) size.
pub const MAX_WRITE_BYTES: u64 = 64 << 20;
/// Largest working set.
pub const MAX_WORKING_SET_BYTES: u64 = 64 << 30;

/// The transport a ceiling run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketTransport {
    /// TCP on 127.0.0.1.
    Tcp,
    /// A Unix stream socket in a temporary directory.
    Uds,
}

impl SocketTransport {
    /// What the transport is, for people.
    pub fn describe(self) -> &'static str {
        match self {
            SocketTransport::Tcp => "loopback TCP",
            SocketTransport::Uds => "Unix socket",
        }
    }
}

/// `kvstrata bench socket`: the loopback socket ceiling.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketBenchArgs {
    /// Transport: tcp (127.0.0.1) or uds (a Unix socket in a temporary directory).
    #[arg(long, value_enum, default_value_t = SocketTransport::Tcp)]
    pub transport: SocketTransport,
    /// Connections, each with its own sender and receiver thread.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Bytes per write and per read (e.g. 256KiB, 1MiB): the benchmark's block size.
    #[arg(long, default_value = "256KiB")]
    pub write_size: ByteSize,
    /// Bytes the senders pick their blocks from, at random (all senders share
    /// it; 0: one block, which stays in the CPU's caches)
    #[arg(long, default_value = "1GiB")]
    pub working_set: ByteSize,
    /// Length of the measured phase.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured traffic before the measured phase.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Print the report as JSON (as the global `--json`, which goes before `bench`).
    #[arg(long)]
    pub json: bool,
}

impl Default for SocketBenchArgs {
    fn default() -> Self {
        SocketBenchArgs {
            transport: SocketTransport::Tcp,
            connections: 4,
            write_size: ByteSize::kib(256),
            working_set: ByteSize::gib(1),
            duration: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            json: false,
        }
    }
}

impl SocketBenchArgs {
    /// Checks the flags; the error names the flag.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(BenchError::InvalidArg {
                field: "--connections",
                reason: format!("{} is not in 1..={MAX_CONNECTIONS}", self.connections),
            });
        }
        let size = self.write_size.as_u64();
        if size == 0 || size > MAX_WRITE_BYTES {
            return Err(BenchError::InvalidArg {
                field: "--write-size",
                reason: format!(
                    "{} is not in 1 B..={}",
                    self.write_size,
                    ByteSize(MAX_WRITE_BYTES)
                ),
            });
        }
        if self.working_set.as_u64() > MAX_WORKING_SET_BYTES {
            return Err(BenchError::InvalidArg {
                field: "--working-set",
                reason: format!(
                    "{} is more than {}",
                    self.working_set,
                    ByteSize(MAX_WORKING_SET_BYTES)
                ),
            });
        }
        if self.duration.is_zero() {
            return Err(BenchError::InvalidArg {
                field: "--duration",
                reason: "must be longer than 0s".into(),
            });
        }
        Ok(())
    }
}

/// Result of [`run_socket_bench`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SocketBenchReport {
    pub transport: SocketTransport,
    pub connections: usize,
    pub write_size: u64,
    /// Bytes of the buffer the blocks were written from (whole blocks).
    pub working_set: u64,
    /// Bytes read per second in the measured phase, decimal GB.
    pub gb_per_s: f64,
    /// Bytes read in the measured phase.
    pub bytes: u64,
    /// Length of the measured phase.
    pub seconds: f64,
    /// CPU time (user + system) of this process in the measured phase, per
    /// second of it: 2.0 means two CPUs busy.
    pub cpus: f64,
    /// Bytes read per CPU-second, decimal GB.
    pub gb_per_cpu_s: f64,
    /// Bytes written and read over the whole run, warm-up included: equal,
    /// since every connection is read to its end.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl SocketBenchReport {
    /// One line for people.
    pub fn print_human(&self) {
        println!(
            "socket ceiling ({}, {} connections, {} writes from {}): {:.2} GB/s over {:.1} s, {:.2} CPUs busy ({:.2} GB per CPU-second)",
            self.transport.describe(),
            self.connections,
            ByteSize(self.write_size),
            ByteSize(self.working_set),
            self.gb_per_s,
            self.seconds,
            self.cpus,
            self.gb_per_cpu_s,
        );
    }
}

/// One connected pair: the sending (accepted) end and the receiving end.
enum Pair {
    Tcp(TcpStream, TcpStream),
    Uds(UnixStream, UnixStream),
}

/// A stream end whose write half can be closed.
trait StreamEnd: Read + Write + Send + 'static {
    fn close_write(&self);
}

impl StreamEnd for TcpStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl StreamEnd for UnixStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.to_string();
    move |source| BenchError::Io { what, source }
}

/// Opens `n` connected pairs on `transport`, with kvstrata's socket options.
fn connect_pairs(transport: SocketTransport, n: usize) -> Result<Vec<Pair>, BenchError> {
    let mut pairs = Vec::with_capacity(n);
    match transport {
        SocketTransport::Tcp => {
            let listener =
                TcpListener::bind("127.0.0.1:0").map_err(io_error("bind 127.0.0.1:0"))?;
            let addr = listener
                .local_addr()
                .map_err(io_error("read the listener's address"))?;
            for _ in 0..n {
                let receiver = TcpStream::connect(addr).map_err(io_error("connect over TCP"))?;
                receiver
                    .set_nodelay(true)
                    .map_err(io_error("set TCP_NODELAY"))?;
                let (sender, peer) = listener.accept().map_err(io_error("accept over TCP"))?;
                if let Err(error) = sockets::tune_tcp(&sender, peer) {
                    tracing::debug!(%error, "could not tune a TCP connection");
                }
                pairs.push(Pair::Tcp(sender, receiver));
            }
        }
        SocketTransport::Uds => {
            // Connected sockets outlive the directory and its path.
            let dir = tempfile::Builder::new()
                .prefix("kvstrata-socket-bench")
                .tempdir()
                .map_err(io_error("create a directory for the Unix socket"))?;
            let path = dir.path().join("ceiling.sock");
            let listener = UnixListener::bind(&path).map_err(io_error("bind a Unix socket"))?;
            for _ in 0..n {
                let receiver =
                    UnixStream::connect(&path).map_err(io_error("connect a Unix socket"))?;
                let (sender, _) = listener
                    .accept()
                    .map_err(io_error("accept on a Unix socket"))?;
                for end in [&sender, &receiver] {
                    if let Err(error) = sockets::raise_unix_buffers(end) {
                        tracing::debug!(%error, "could not raise a Unix socket's buffers");
                    }
                }
                pairs.push(Pair::Uds(sender, receiver));
            }
        }
    }
    Ok(pairs)
}

type Worker = JoinHandle<std::io::Result<u64>>;

/// What every pair shares: the blocks, the stop flag, the bytes received.
#[derive(Clone)]
struct Shared {
    blocks: Arc<[u8]>,
    size: usize,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
}

/// The working set: `bytes` rounded up to whole blocks (at least one), every
/// page written so that none faults in the measured phase.
fn working_set(size: usize, bytes: u64) -> Arc<[u8]> {
    let blocks = (bytes as usize).div_ceil(size).max(1);
    let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut set = vec![0u8; blocks * size];
    for block in set.chunks_mut(size) {
        block.copy_from_slice(&pattern);
    }
    set.into()
}

/// Starts the sender and the receiver thread of pair `index`.
fn spawn_pair<S: StreamEnd>(
    mut sender: S,
    receiver: S,
    index: u64,
    shared: Shared,
) -> Result<(Worker, Worker), BenchError> {
    let Shared {
        blocks,
        size,
        stop,
        received,
    } = shared;
    let recv = std::thread::Builder::new()
        .name("ceiling-recv".into())
        .spawn(move || receive_loop(receiver, size, &received))
        .map_err(io_error("start a benchmark thread"))?;
    let send = std::thread::Builder::new()
        .name("ceiling-send".into())
        .spawn(move || {
            let sent = send_loop(&mut sender, &blocks, size, index, &stop);
            // The receiver reads to the end of the stream, then returns.
            sender.close_write();
            sent
        })
        .map_err(io_error("start a benchmark thread"))?;
    Ok((send, recv))
}

/// Writes blocks of `size` picked at random from `set` until `stop`.
/// Returns the bytes written.
fn send_loop<S: Write>(
    s: &mut S,
    set: &[u8],
    size: usize,
    seed: u64,
    stop: &AtomicBool,
) -> std::io::Result<u64> {
    let blocks = (set.len() / size) as u64;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = (rng.next_u64() % blocks) as usize;
        s.write_all(&set[k * size..(k + 1) * size])?;
        sent += size as u64;
    }
    Ok(sent)
}

/// Reads until the end of the stream, adding what it read to `received`.
fn receive_loop<S: Read>(mut s: S, size: usize, received: &AtomicU64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; size];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total += n as u64;
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Measures the ceiling (blocking: call it from a blocking thread).
pub fn run_socket_bench(args: &SocketBenchArgs) -> Result<SocketBenchReport, BenchError> {
    args.check()?;
    let size = args.write_size.as_u64() as usize;
    let pairs = connect_pairs(args.transport, args.connections)?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let shared = Shared {
        blocks: working_set(size, args.working_set.as_u64()),
        size,
        stop: stop.clone(),
        received: received.clone(),
    };

    let mut senders = Vec::with_capacity(args.connections);
    let mut receivers = Vec::with_capacity(args.connections);
    for (index, pair) in (0u64..).zip(pairs) {
        let started = match pair {
            Pair::Tcp(s, r) => spawn_pair(s, r, index, shared.clone()),
            Pair::Uds(s, r) => spawn_pair(s, r, index, shared.clone()),
        };
        match started {
            Ok((send, recv)) => {
                senders.push(send);
                receivers.push(recv);
            }
            Err(e) => {
                // Stop the pairs already running before giving up.
                stop.store(true, Ordering::Relaxed);
                senders.into_iter().chain(receivers).for_each(|h| {
                    let _ = h.join();
                });
                return Err(e);
            }
        }
    }

    std::thread::sleep(args.warmup);
    let (bytes0, cpu0, t0) = (
        received.load(Ordering::Relaxed),
        process_cpu(),
        Instant::now(),
    );
    std::thread::sleep(args.duration);
    let (bytes1, cpu1, seconds) = (
        received.load(Ordering::Relaxed),
        process_cpu(),
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);

    let join = |h: Worker, side: &str| -> Result<u64, BenchError> {
        match h.join() {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(source)) => Err(BenchError::Io {
                what: format!("{side} on a {} connection", args.transport.describe()),
                source,
            }),
            Err(_) => Err(BenchError::Thread(format!("a {side} thread panicked"))),
        }
    };
    // Senders first: each closes its write half, which ends its receiver.
    let mut bytes_sent = 0;
    let mut first_error = None;
    for h in senders {
        match join(h, "send") {
            Ok(n) => bytes_sent += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut bytes_received = 0;
    for h in receivers {
        match join(h, "receive") {
            Ok(n) => bytes_received += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let bytes = bytes1 - bytes0;
    let cpu_s = cpu1.saturating_sub(cpu0).as_secs_f64();
    Ok(SocketBenchReport {
        transport: args.transport,
        connections: args.connections,
        write_size: size as u64,
        working_set: shared.blocks.len() as u64,
        gb_per_s: crate::report::gb_per_s(bytes, seconds),
        bytes,
        seconds,
        cpus: if seconds > 0.0 { cpu_s / seconds } else { 0.0 },
        gb_per_cpu_s: if cpu_s > 0.0 {
            bytes as f64 / cpu_s / 1e9
        } else {
            0.0
        },
        bytes_sent,
        bytes_received,
    })
}

/// Runs the ceiling and prints it: JSON on stdout with `json`, one line otherwise.
pub fn run_socket_and_print(
    args: &SocketBenchArgs,
    json: bool,
) -> Result<SocketBenchReport, BenchError> {
    let report = run_socket_bench(args)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print_human();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(transport: SocketTransport) -> SocketBenchArgs {
        SocketBenchArgs {
            transport,
            connections: 3,
            write_size: ByteSize::kib(64),
            working_set: ByteSize::kib(64 * 5),
            duration: Duration::from_millis(150),
            warmup: Duration::from_millis(20),
            json: false,
        }
    }

    #[test]
    fn both_transports_carry_every_byte_written() {
        for transport in [SocketTransport::Tcp, SocketTransport::Uds] {
            let r = run_socket_bench(&short(transport)).unwrap();
            assert!(r.bytes > 0 && r.gb_per_s > 0.0, "{r:?}");
            // Every connection is read to its end: nothing written is lost,
            // nothing is counted twice.
            assert_eq!(r.bytes_sent, r.bytes_received, "{r:?}");
            assert!(r.bytes <= r.bytes_received, "{r:?}");
            assert_eq!(r.bytes_sent % (64 << 10), 0, "whole writes: {r:?}");
            assert!(r.seconds >= 0.15, "{r:?}");
            assert_eq!((r.transport, r.connections), (transport, 3));
            assert_eq!(r.working_set, 5 * (64 << 10), "{r:?}");
        }
    }

    #[test]
    fn the_working_set_is_whole_blocks_and_at_least_one() {
        assert_eq!(working_set(1000, 0).len(), 1000);
        assert_eq!(working_set(1000, 2500).len(), 3000);
        let set = working_set(300, 600);
        assert_eq!(&set[..300], &set[300..], "every block holds the pattern");
        assert_eq!(set[251], 0);
    }

    #[test]
    fn bad_flags_are_named() {
        let cases = [
            (
                SocketBenchArgs {
                    connections: 0,
                    ..short(SocketTransport::Tcp)
                },
                "--connections",
            ),
            (
                SocketBenchArgs {
                    write_size: ByteSize(0),
                    ..short(SocketTransport::Tcp)
                },
                "--write-size",
            ),
            (
                SocketBenchArgs {
                    write_size: ByteSize(MAX_WRITE_BYTES + 1),
                    ..short(SocketTransport::Uds)
                },
                "--write-size",
            ),
            (
                SocketBenchArgs {
                    working_set: ByteSize(MAX_WORKING_SET_BYTES + 1),
                    ..short(SocketTransport::Tcp)
                },
                "--working-set",
            ),
            (
                SocketBenchArgs {
                    duration: Duration::ZERO,
                    ..short(SocketTransport::Uds)
                },
                "--duration",
            ),
        ];
        for (args, field) in cases {
            match run_socket_bench(&args) {
                Err(BenchError::InvalidArg { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
