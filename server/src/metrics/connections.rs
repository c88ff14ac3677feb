//! The connection counters of the gRPC listeners (TCP, Unix socket, SGLang
//! socket), updated by [`crate::transport`] and read at scrape time:
//! connections open and accepted per listener, refused by the connection
//! limits, closed by the daemon's deadlines, and requests refused for
//! malformed gRPC framing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::family::{Kind, family, single};

/// A gRPC listener, the `listener` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnListener {
    Tcp,
    Unix,
    Sglang,
}

impl ConnListener {
    pub const ALL: [ConnListener; 3] =
        [ConnListener::Tcp, ConnListener::Unix, ConnListener::Sglang];

    pub fn label(self) -> &'static str {
        match self {
            ConnListener::Tcp => "tcp",
            ConnListener::Unix => "unix",
            ConnListener::Sglang => "sglang",
        }
    }
}

/// Why a connection was closed at accept time, the `reason` label of
/// `kvstrata_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefused {
    /// `server.max_connections` connections were open.
    DaemonLimit,
    /// `server.max_connections_per_peer` connections of this peer were open.
    PeerLimit,
}

impl ConnRefused {
    pub const ALL: [ConnRefused; 2] = [ConnRefused::DaemonLimit, ConnRefused::PeerLimit];

    pub fn label(self) -> &'static str {
        match self {
            ConnRefused::DaemonLimit => "daemon_limit",
            ConnRefused::PeerLimit => "peer_limit",
        }
    }
}

/// Why the daemon closed an open connection, the `reason` label of
/// `kvstrata_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnClosed {
    /// No HTTP/2 preface and SETTINGS (or TLS handshake) within
    /// `server.handshake_timeout_ms`.
    HandshakeTimeout,
    /// No call open for `server.idle_timeout_ms`.
    IdleTimeout,
}

impl ConnClosed {
    pub const ALL: [ConnClosed; 2] = [ConnClosed::HandshakeTimeout, ConnClosed::IdleTimeout];

    pub fn label(self) -> &'static str {
        match self {
            ConnClosed::HandshakeTimeout => "handshake_timeout",
            ConnClosed::IdleTimeout => "idle_timeout",
        }
    }
}

/// A request refused before it reached a service, the `reason` label of
/// `kvstrata_requests_malformed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A `content-type` other than `application/grpc[+proto|;…]` (HTTP 415).
    ContentType,
    /// A second message on a call that takes one (INVALID_ARGUMENT).
    UnaryMessages,
}

impl Malformed {
    pub const ALL: [Malformed; 2] = [Malformed::ContentType, Malformed::UnaryMessages];

    pub fn label(self) -> &'static str {
        match self {
            Malformed::ContentType => "content_type",
            Malformed::UnaryMessages => "unary_messages",
        }
    }
}

/// The counters; one per daemon, shared by its listeners.
#[derive(Debug, Default)]
pub struct ConnCounters {
    open: [AtomicU64; 3],
    accepted: [AtomicU64; 3],
    refused: [AtomicU64; 2],
    closed: [AtomicU64; 2],
    malformed: [AtomicU64; 2],
    accept_errors: AtomicU64,
}

impl ConnCounters {
    /// A connection of `listener` was admitted (open until [`Self::closed`]).
    pub fn opened(&self, listener: ConnListener) {
        self.accepted[listener as usize].fetch_add(1, Ordering::Relaxed);
        self.open[listener as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An admitted connection of `listener` is gone.
    pub fn closed(&self, listener: ConnListener) {
        self.open[listener as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// The daemon closed a connection for `reason`.
    pub fn closed_by_daemon(&self, reason: ConnClosed) {
        self.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, reason: ConnRefused) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn malformed(&self, reason: Malformed) {
        self.malformed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `accept(2)` failed (e.g. out of file descriptors).
    pub fn accept_error(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections of `listener` open now.
    pub fn open(&self, listener: ConnListener) -> u64 {
        self.open[listener as usize].load(Ordering::Relaxed)
    }

    /// Connections open now over every listener.
    pub fn open_total(&self) -> u64 {
        ConnListener::ALL.iter().map(|&l| self.open(l)).sum()
    }

    pub fn refused_count(&self, reason: ConnRefused) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    pub fn closed_count(&self, reason: ConnClosed) -> u64 {
        self.closed[reason as usize].load(Ordering::Relaxed)
    }

    pub fn malformed_count(&self, reason: Malformed) -> u64 {
        self.malformed[reason as usize].load(Ordering::Relaxed)
    }

    /// The Prometheus collector of these counters.
    pub fn collector(self: &Arc<Self>) -> ConnCollector {
        ConnCollector {
            counters: Arc::clone(self),
        }
    }
}

/// `kvstrata_connections_*` and `kvstrata_requests_malformed_total`.
#[derive(Debug)]
pub struct ConnCollector {
    counters: Arc<ConnCounters>,
}

impl Collector for ConnCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        let per_listener = |a: &[AtomicU64; 3]| {
            ConnListener::ALL.map(|l| (l.label(), a[l as usize].load(Ordering::Relaxed)))
        };
        family(
            &mut encoder,
            Kind::Gauge,
            "kvstrata_connections_open",
            "gRPC connections open now, by listener",
            "listener",
            &per_listener(&c.open),
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_connections_accepted",
            "gRPC connections admitted, by listener",
            "listener",
            &per_listener(&c.accepted),
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_connections_refused",
            "gRPC connections closed at accept by the connection limits: daemon_limit (server.max_connections) or peer_limit (server.max_connections_per_peer)",
            "reason",
            &ConnRefused::ALL.map(|r| (r.label(), c.refused_count(r))),
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_connections_closed",
            "gRPC connections the daemon closed: handshake_timeout (server.handshake_timeout_ms) or idle_timeout (server.idle_timeout_ms)",
            "reason",
            &ConnClosed::ALL.map(|r| (r.label(), c.closed_count(r))),
        )?;
        single(
            &mut encoder,
            Kind::Counter,
            "kvstrata_connection_accept_errors",
            "accept() failures on the gRPC listeners (e.g. out of file descriptors); the listener pauses 100 ms after each",
            c.accept_errors.load(Ordering::Relaxed),
        )?;
        family(
            &mut encoder,
            Kind::Counter,
            "kvstrata_requests_malformed",
            "Requests refused before any service: content_type (not application/grpc: HTTP 415) or unary_messages (a second message on a one-message call: INVALID_ARGUMENT)",
            "reason",
            &Malformed::ALL.map(|r| (r.label(), c.malformed_count(r))),
        )
    }
}
