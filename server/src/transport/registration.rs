//! What the daemon's two registration sockets share: the mempool socket
//! ([`crate::shm::mempool`]) and the KV-region socket ([`crate::region`]).
//! Both accept same-host clients on a Unix socket, read a preamble with file
//! descriptors attached (`SCM_RIGHTS`), answer, and keep the registration for
//! as long as the client keeps the connection open.
//!
//! - [`serve`]: the accept loop (peers whose uid is not allowed are closed
//!   at once; one task per other connection);
//! - [`read_preamble`]: bytes and fds until the format's parser says the
//!   preamble is complete, within [`PREAMBLE_TIMEOUT`];
//! - [`hold_until_closed`]: the wait for the client to hang up that ends a
//!   registration.
//!
//! The formats are parsed by `kvstrata_types::wire`, their one owner; what
//! a socket registers, and how it refuses, is the socket's own module.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;

/// A client must finish its preamble within this time.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for this many fds in one message's control data; the kernel closes
/// any beyond it and the read fails with [`ReadError::TooManyFds`].
const CONTROL_FDS: usize = 64;

/// Accepts connections on `listener` until `shutdown`. A peer whose uid
/// `auth` does not allow is closed at once (`denied` counts it; `socket`
/// names the socket in the log line); every other connection runs
/// `handle` on a task of its own.
pub async fn serve<H, F>(
    listener: UnixListener,
    shutdown: CancellationToken,
    auth: Option<Arc<Auth>>,
    socket: &'static str,
    denied: impl Fn(),
    handle: H,
) -> io::Result<()>
where
    H: Fn(UnixStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    while let Some(stream) =
        crate::auth::next_admitted_peer(&listener, &shutdown, auth.as_deref(), socket, &denied)
            .await
    {
        tokio::spawn(handle(stream));
    }
    Ok(())
}

/// What a format's parser says about the bytes received so far.
pub enum Parsed<T> {
    /// Not complete: the preamble is this many bytes in all.
    Need(usize),
    /// A complete preamble.
    Complete(T),
}

/// A complete preamble and every fd that came with it (owned: closed when
/// dropped, so a refused registration leaks none).
pub struct Received<T> {
    pub preamble: T,
    pub fds: Vec<OwnedFd>,
}

/// Why no complete preamble was read.
#[derive(Debug)]
pub enum ReadError<E> {
    /// The client hung up after this many of the preamble's bytes.
    Closed(usize),
    /// More fds attached than the socket takes.
    TooManyFds,
    /// The parser refused the bytes.
    Invalid(E),
    /// No complete preamble within [`PREAMBLE_TIMEOUT`].
    Timeout,
    Io(io::Error),
}

/// Reads a preamble: the first `first_bytes`, then as many as `parse` asks
/// for until it answers [`Parsed::Complete`], keeping every fd sent with
/// them. More than `max_fds` fds fail the read as soon as they arrive.
pub async fn read_preamble<T, E>(
    stream: &UnixStream,
    first_bytes: usize,
    max_fds: usize,
    parse: impl FnMut(&[u8]) -> Result<Parsed<T>, E>,
) -> Result<Received<T>, ReadError<E>> {
    tokio::time::timeout(
        PREAMBLE_TIMEOUT,
        read_until_complete(stream, first_bytes, max_fds, parse),
    )
    .await
    .unwrap_or(Err(ReadError::Timeout))
}

async fn read_until_complete<T, E>(
    stream: &UnixStream,
    first_bytes: usize,
    max_fds: usize,
    mut parse: impl FnMut(&[u8]) -> Result<Parsed<T>, E>,
) -> Result<Received<T>, ReadError<E>> {
    let mut buf = vec![0u8; first_bytes];
    let mut filled = 0usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut need = first_bytes;
    loop {
        while filled < need {
            stream.readable().await.map_err(ReadError::Io)?;
            let r = stream.try_io(Interest::READABLE, || {
                recv_with_fds(stream.as_raw_fd(), &mut buf[filled..need], &mut fds)
            });
            match r {
                Ok((0, _)) => return Err(ReadError::Closed(filled)),
                Ok((n, truncated)) => {
                    if truncated || fds.len() > max_fds {
                        return Err(ReadError::TooManyFds);
                    }
                    filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        match parse(&buf[..filled]).map_err(ReadError::Invalid)? {
            Parsed::Need(n) => {
                need = n;
                buf.resize(need, 0);
            }
            Parsed::Complete(preamble) => return Ok(Received { preamble, fds }),
        }
    }
}

/// Keeps registration `id`'s connection until the client hangs up (or the
/// connection fails) or `shutdown`. Bytes the client sends meanwhile are read
/// and dropped (a debug line names `socket`).
pub async fn hold_until_closed(
    stream: &mut UnixStream,
    shutdown: &CancellationToken,
    socket: &'static str,
    id: u64,
) {
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => tracing::debug!(id, bytes = n, "{socket}: ignoring bytes after registration"),
            },
        }
    }
}

/// The peer's pid (for log lines and ownership checks), if the kernel tells.
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    stream.peer_cred().ok().and_then(|c| c.pid())
}

/// One non-blocking `recvmsg`: data into `buf`, and every fd passed with it
/// into `fds` (owned, so closed if refused later). Returns the byte count and
/// whether the kernel truncated the control data (fds beyond our room are
/// closed by the kernel).
fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<(usize, bool)> {
    // u64 words keep the control buffer aligned for `cmsghdr`.
    const CONTROL_WORDS: usize = (CONTROL_FDS * 4 + 64) / 8;
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the CMSG_* walk stays within `msg_controllen` as the kernel set
    // it; every fd in an SCM_RIGHTS message is now ours to own (and close).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let header = data as usize - c as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, msg.msg_flags & libc::MSG_CTRUNC != 0))
}
