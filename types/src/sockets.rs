//! Socket options of kvstrata's connections, in one place.
//!
//! - [`raise_unix_buffers`]: 4 MiB send and receive buffers on a Unix stream
//!   (the default, `net.core.wmem_default`, about 208 KiB, splits a 1 MiB
//!   block into several writes and as many wake-ups of the reader). The
//!   daemon and every Rust client ask for them.
//! - [`tune_tcp`]: what the daemon sets on an accepted TCP connection: no
//!   Nagle delay, and from a loopback peer a congestion controller that
//!   does not pace ([`LOOPBACK_CONGESTION`]). Pacing controllers (BBR, a
//!   common system default) space a large write's segments out with timers
//!   even over loopback, where there is no link to protect: on a 2-vCPU
//!   machine with BBR as the default, BatchGet over loopback TCP moved a
//!   third more per second with Reno on the daemon's side
//!   (docs/benchmarks.md). A connection from another host keeps the
//!   system's controller. Clients keep theirs: on the client's side, Reno
//!   sped BatchPut up with 4 clients and slowed it down with 16.
//!
//! Every option is best effort: a refusal leaves the kernel's default,
//! which costs speed, never correctness; the caller may log the error.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use socket2::SockRef;

/// Send and receive buffer asked for on each Unix-socket connection (the
/// kernel caps it at `net.core.wmem_max` / `rmem_max`).
pub const UNIX_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The congestion controller set on loopback TCP connections. Reno is the
/// one every Linux kernel builds in and lets any user choose (it is always
/// in `net.ipv4.tcp_allowed_congestion_control`); it does not pace.
pub const LOOPBACK_CONGESTION: &str = "reno";

/// Environment variable that overrides [`LOOPBACK_CONGESTION`]: another
/// controller's name, or `system` (or empty) to keep the system default.
pub const LOOPBACK_CONGESTION_ENV: &str = "KVSTRATA_LOOPBACK_TCP_CONGESTION";

/// Asks for [`UNIX_SOCKET_BUFFER_BYTES`] of send and receive buffer.
pub fn raise_unix_buffers(stream: &impl AsFd) -> io::Result<()> {
    let socket = SockRef::from(stream);
    socket.set_send_buffer_size(UNIX_SOCKET_BUFFER_BYTES)?;
    socket.set_recv_buffer_size(UNIX_SOCKET_BUFFER_BYTES)
}

/// What [`tune_tcp`] did about the congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// Set to this controller (a loopback peer).
    Set(&'static str),
    /// Left as the system chose: the peer is on another host, or the
    /// override says `system`.
    Kept,
}

/// Turns Nagle's algorithm off and, when `peer` is a loopback address,
/// sets the loopback congestion controller. Errors are the kernel's
/// refusals (the connection works without either option).
pub fn tune_tcp(stream: &impl AsFd, peer: SocketAddr) -> io::Result<Congestion> {
    let socket = SockRef::from(stream);
    socket.set_tcp_nodelay(true)?;
    match loopback_congestion() {
        Some(name) if peer.ip().to_canonical().is_loopback() => {
            socket.set_tcp_congestion(name.as_bytes())?;
            Ok(Congestion::Set(name))
        }
        _ => Ok(Congestion::Kept),
    }
}

/// The congestion controller a TCP socket uses (its name).
pub fn congestion(stream: &impl AsFd) -> io::Result<String> {
    let name = SockRef::from(stream).tcp_congestion()?;
    Ok(String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_string())
}

/// The controller for loopback connections: [`LOOPBACK_CONGESTION`] unless
/// [`LOOPBACK_CONGESTION_ENV`] names another or `system` (read once).
pub fn loopback_congestion() -> Option<&'static str> {
    static CHOSEN: OnceLock<Option<String>> = OnceLock::new();
    CHOSEN
        .get_or_init(|| parse_override(std::env::var(LOOPBACK_CONGESTION_ENV).ok().as_deref()))
        .as_deref()
}

fn parse_override(value: Option<&str>) -> Option<String> {
    match value.map(str::trim) {
        None => Some(LOOPBACK_CONGESTION.to_string()),
        Some("" | "system") => None,
        Some(name) => Some(name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_loopback_connection_gets_the_loopback_controller_on_both_ends() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(
            tune_tcp(&client, client.peer_addr().unwrap()).unwrap(),
            Congestion::Set(LOOPBACK_CONGESTION)
        );
        assert_eq!(
            tune_tcp(&server, peer).unwrap(),
            Congestion::Set(LOOPBACK_CONGESTION)
        );
        assert_eq!(congestion(&client).unwrap(), LOOPBACK_CONGESTION);
        assert_eq!(congestion(&server).unwrap(), LOOPBACK_CONGESTION);
        assert!(SockRef::from(&client).tcp_nodelay().unwrap());
        assert!(SockRef::from(&server).tcp_nodelay().unwrap());
    }

    #[test]
    fn a_peer_on_another_host_keeps_the_system_controller() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let before = congestion(&client).unwrap();
        // The address only decides; the socket is a loopback one.
        let remote: SocketAddr = "192.0.2.7:50051".parse().unwrap();
        assert_eq!(tune_tcp(&client, remote).unwrap(), Congestion::Kept);
        assert_eq!(congestion(&client).unwrap(), before);
        assert!(SockRef::from(&client).tcp_nodelay().unwrap());
    }

    #[test]
    fn ipv4_mapped_loopback_counts_as_loopback() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        assert!(mapped.ip().to_canonical().is_loopback());
    }

    #[test]
    fn the_override_names_a_controller_or_keeps_the_system_one() {
        assert_eq!(parse_override(None).as_deref(), Some("reno"));
        assert_eq!(parse_override(Some("system")), None);
        assert_eq!(parse_override(Some(" ")), None);
        assert_eq!(parse_override(Some("cubic")).as_deref(), Some("cubic"));
    }

    #[test]
    fn unix_buffers_are_raised() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        raise_unix_buffers(&a).unwrap();
        // Linux keeps twice what it is asked for, capped at wmem_max/rmem_max.
        let cap = |name: &str| -> usize {
            let text = std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap();
            text.trim().parse().unwrap()
        };
        let socket = SockRef::from(&a);
        assert_eq!(
            socket.send_buffer_size().unwrap(),
            2 * UNIX_SOCKET_BUFFER_BYTES.min(cap("wmem_max"))
        );
        assert_eq!(
            socket.recv_buffer_size().unwrap(),
            2 * UNIX_SOCKET_BUFFER_BYTES.min(cap("rmem_max"))
        );
    }
}
