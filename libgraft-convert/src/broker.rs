//! Talking to graftd's per-namespace broker.
//!
//! Cached connections ([`Conn`]: one shared by every request, one of the
//! pool's own) are kept at high descriptor numbers with close-on-exec.
//! Before each use one is checked: same pid (a forked child never shares its
//! parent's connection mid-request: it closes its inherited copy and
//! connects anew), same inode (the application may have closed or reused the
//! number; then the number is no longer ours and is left alone), and same
//! network namespace as the application's socket being grafted (compared as
//! netns cookies, one getsockopt each: a socket made after a setns() belongs
//! to the new namespace, whose broker has its endpoints, so the connection
//! to the old one is closed and made anew in the thread's namespace; a
//! socket of a namespace the thread has left goes to that namespace's
//! broker while a cached connection to it is open, else to the thread's
//! broker on a one-off connection, never cached). An atomic
//! try-lock holding the owner's pid guards the shared connection; a thread
//! or signal handler that finds it busy uses a one-off connection instead,
//! so nothing ever waits for a lock. A lock still held by another pid was
//! held across fork() and is taken over. Every broker socket has send and
//! receive timeouts, so no call blocks forever on a stuck graftd.
//!
//! graftd restarting (crash, upgrade) is invisible to programs: a broker that
//! refuses connections (no listener: graftd is down) is retried every 10 ms
//! for up to `GRAFT_WAIT_MS` (default 1000) before the call fails closed, and
//! a connection that breaks mid-request (graftd died with it) is replaced
//! once. The wait is a plain `nanosleep` loop: no allocation, no lock, safe
//! in a signal handler or a forked child.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use graft_core::proto::broker::{Op, Reply, Request, REPLY_LEN, REQUEST_LEN};
use libc::c_int;

use crate::sys;

/// Seconds a broker exchange may take.
pub const TIMEOUT_SECS: i64 = 5;

/// `GRAFT_WAIT_MS`, set once by the constructor.
static WAIT_MS: AtomicU32 = AtomicU32::new(graft_core::DEFAULT_WAIT_MS);
/// Pause between two connection attempts to an absent broker.
const RETRY_MS: u32 = 10;

/// Sets how long [`connect`] waits for an absent broker.
pub fn set_wait_ms(ms: u32) {
    WAIT_MS.store(ms, Ordering::Relaxed);
}

/// The connection requests share; the pool has its own ([`crate::pool`]).
static SHARED: Conn = Conn::new();
static LOCK: PidLock = PidLock::new();

/// A try-lock that records its holder's pid (0 when free): never waits, so
/// a signal handler or another thread takes another path instead, and a
/// child of fork() can take over a lock its parent held.
pub struct PidLock(AtomicI32);

impl PidLock {
    pub const fn new() -> Self {
        PidLock(AtomicI32::new(0))
    }

    /// Takes the lock for `pid`; false when this process holds it already
    /// (a signal handler interrupting the holder) or another one does.
    pub fn try_lock(&self, pid: i32) -> bool {
        let cur = self.0.load(Ordering::Acquire);
        if cur == pid {
            return false;
        }
        // A lock still held by another pid was held across fork(): taken over.
        self.0
            .compare_exchange(cur, pid, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub fn unlock(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Why an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// No broker to connect to (graftd not running for this namespace).
    Unreachable(c_int),
    /// graftd did not answer within [`TIMEOUT_SECS`].
    Timeout,
    /// The connection broke mid-exchange.
    Io(c_int),
    /// The reply is not a valid record.
    Protocol(&'static str),
    /// The descriptor could not be received (MSG_CTRUNC: no free slot).
    NoRoom,
}

/// A decoded reply and, on success, the host socket.
pub struct Answer {
    pub reply: Reply,
    pub fd: Option<OwnedFd>,
    /// The other sockets of a successful `SocketBatch` reply (none otherwise).
    pub extra: [Option<OwnedFd>; sys::MAX_FDS - 1],
}

/// Sends `req` to the broker named `name` and returns its answer. `ns` is
/// the network namespace of the application's socket ([`sys::sys_netns_key`];
/// `None`: unknown, so no cached connection is used).
pub fn ask(name: &str, req: &Request, ns: Option<u64>) -> Result<Answer, Error> {
    let mut buf = [0u8; REQUEST_LEN];
    req.encode(&mut buf);
    // A real getpid per request rather than a pid cached by fork handlers:
    // children made by vfork(), posix_spawn() or a raw clone() run no
    // handlers, and must still never share the parent's connection.
    let pid = sys::sys_getpid();
    if let Some(ns) = ns.filter(|_| LOCK.try_lock(pid)) {
        let r = SHARED.ask(name, &buf, pid, ns);
        LOCK.unlock();
        r
    } else {
        ask_once(name, &buf)
    }
}

/// One exchange on a connection of its own, made in the calling thread's
/// namespace and closed after.
fn ask_once(name: &str, buf: &[u8]) -> Result<Answer, Error> {
    let conn = connect(name)?;
    match exchange(conn.as_raw_fd(), buf) {
        // graftd went away with the request: once more, on a new one.
        Err(Error::Io(_)) => {
            drop(conn);
            let conn = connect(name)?;
            exchange(conn.as_raw_fd(), buf)
        }
        r => r,
    }
}

/// A cached broker connection, kept at a high descriptor number with
/// close-on-exec, and at most one request on it whose reply is still to be
/// read ([`Conn::send_ahead`]). Its user holds a lock for it (the shared
/// one [`LOCK`], the pool's its own).
pub struct Conn {
    fd: AtomicI32,
    pid: AtomicI32,
    ino: AtomicU64,
    /// The namespace key ([`sys::sys_netns_key`]) of the connection itself:
    /// the namespace whose broker it leads to.
    ns: AtomicU64,
    /// The tag of the request sent ahead, 0 when none.
    ahead: AtomicU32,
}

impl Conn {
    pub const fn new() -> Self {
        Conn {
            fd: AtomicI32::new(-1),
            pid: AtomicI32::new(0),
            ino: AtomicU64::new(0),
            ns: AtomicU64::new(0),
            ahead: AtomicU32::new(0),
        }
    }

    /// One exchange for a socket of namespace `ns`, on the cached
    /// connection (made anew when needed). A reply still owed for a request
    /// sent ahead is read and dropped first. When the application's socket
    /// belongs to another namespace than the calling thread (it called
    /// setns() since), the thread's own broker answers on a one-off
    /// connection, as before the socket was cached anywhere.
    pub fn ask(&self, name: &str, buf: &[u8], pid: i32, ns: u64) -> Result<Answer, Error> {
        let (fd, fresh) = match self.get(pid, ns) {
            Some(fd) => (fd, false),
            None => match self.open(name, pid, ns)? {
                Some(fd) => (fd, true),
                None => return ask_once(name, buf),
            },
        };
        if self.ahead.load(Ordering::Relaxed) != 0 {
            drop(self.take_ahead_on(fd, true));
        }
        match exchange(fd, buf) {
            Ok(a) => Ok(a),
            // A connection that worked before may have been closed by a
            // restarted graftd: try once more on a fresh one.
            Err(Error::Io(_)) if !fresh => {
                self.forget(true);
                let Some(fd) = self.open(name, pid, ns)? else {
                    return ask_once(name, buf);
                };
                let r = exchange(fd, buf);
                if r.is_err() {
                    self.forget(true);
                }
                r
            }
            Err(e) => {
                // After a timeout a late reply could still arrive: never reuse.
                self.forget(true);
                Err(e)
            }
        }
    }

    /// Sends a request without waiting for its reply, on the cached
    /// connection only (never one made for it), when no other is owed;
    /// `tag` (not 0) names it for [`Conn::take_ahead`]. False when not sent.
    pub fn send_ahead(&self, buf: &[u8], pid: i32, ns: u64, tag: u32) -> bool {
        if self.ahead.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let Some(fd) = self.get(pid, ns) else {
            return false;
        };
        match sys::sys_send(fd, buf) {
            Ok(n) if n == buf.len() => {
                self.ahead.store(tag, Ordering::Relaxed);
                true
            }
            _ => {
                self.forget(true);
                false
            }
        }
    }

    /// The tag of the request sent ahead whose reply is owed (0: none).
    pub fn owed(&self) -> u32 {
        self.ahead.load(Ordering::Relaxed)
    }

    /// The reply owed for the request sent ahead, if one is owed and (unless
    /// `wait`) has already arrived.
    pub fn take_ahead(&self, pid: i32, ns: u64, wait: bool) -> Option<Result<Answer, Error>> {
        if self.ahead.load(Ordering::Relaxed) == 0 {
            return None;
        }
        // Gone, moved or taken by the application: forgotten with the reply.
        let fd = self.get(pid, ns)?;
        self.take_ahead_on(fd, wait)
    }

    fn take_ahead_on(&self, fd: RawFd, wait: bool) -> Option<Result<Answer, Error>> {
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        match receive(fd, flags) {
            Err(Error::Timeout) if !wait => None,
            r => {
                self.ahead.store(0, Ordering::Relaxed);
                if r.is_err() {
                    self.forget(true);
                }
                Some(r)
            }
        }
    }

    /// The cached connection, if it is still ours, still the same socket,
    /// and leads to the broker of namespace `ns`.
    fn get(&self, pid: i32, ns: u64) -> Option<RawFd> {
        let fd = self.fd.load(Ordering::Relaxed);
        if fd < 0 {
            return None;
        }
        // One fstat per request, kept on purpose: the number can be closed
        // behind the library's back (close_range or closefrom made with raw
        // system calls, libc-internal closes) and handed out again, e.g. by
        // accept() or recvmsg() in a busy server; writing a broker request
        // into such a socket would corrupt the application's traffic.
        // Watching our interposed close/dup2/dup3 cannot see those paths,
        // and every cheaper check (fcntl flags) does not tell two sockets
        // apart.
        if !sys::sys_is_socket(fd, self.ino.load(Ordering::Relaxed)) {
            // The application closed or reused the number: not ours to close.
            self.forget(false);
            return None;
        }
        if self.pid.load(Ordering::Relaxed) != pid {
            // Inherited across fork(): our copy, closed so the parent's
            // stays private.
            self.forget(true);
            return None;
        }
        if self.ns.load(Ordering::Relaxed) != ns {
            // A socket of another namespace (a thread that called setns()):
            // this connection leads to the old namespace's broker and its
            // endpoints.
            self.forget(true);
            return None;
        }
        Some(fd)
    }

    /// Closes the connection of the process that made it (after fork(), in
    /// the child), unless the number is no longer that socket.
    pub fn forget_inherited(&self) {
        let fd = self.fd.load(Ordering::Relaxed);
        self.forget(sys::sys_is_socket(fd, self.ino.load(Ordering::Relaxed)));
    }

    fn forget(&self, close: bool) {
        self.ahead.store(0, Ordering::Relaxed);
        let fd = self.fd.swap(-1, Ordering::Relaxed);
        if close && fd >= 0 {
            sys::sys_close(fd);
        }
    }

    /// A new cached connection for sockets of namespace `ns`; `None` (and
    /// nothing cached) when the calling thread is in another namespace.
    fn open(&self, name: &str, pid: i32, ns: u64) -> Result<Option<RawFd>, Error> {
        let conn = connect(name)?;
        if sys::sys_netns_key(conn.as_raw_fd()) != Some(ns) {
            return Ok(None);
        }
        let fd = match sys::sys_fcntl(conn.as_raw_fd(), libc::F_DUPFD_CLOEXEC, high_fd_floor()) {
            Ok(hi) => {
                drop(conn);
                hi
            }
            Err(_) => conn.into_raw_fd(),
        };
        let ino = sys::sys_fstat(fd).map(|(i, _)| i).unwrap_or(0);
        self.ino.store(ino, Ordering::Relaxed);
        self.pid.store(pid, Ordering::Relaxed);
        self.ns.store(ns, Ordering::Relaxed);
        self.ahead.store(0, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Relaxed);
        Ok(Some(fd))
    }
}

/// Where the library's own long-lived descriptors go: far from the low
/// numbers programs expect to get from socket()/open().
pub fn high_fd_floor() -> libc::c_long {
    let limit = sys::nofile_limit().min(1 << 20);
    (limit - limit / 4) as libc::c_long
}

/// A new connection to the broker, with timeouts.
pub fn connect(name: &str) -> Result<OwnedFd, Error> {
    let s = sys::sys_socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        .map_err(Error::Unreachable)?;
    sys::sys_set_timeouts(s.as_raw_fd(), TIMEOUT_SECS).map_err(Error::Io)?;
    let (addr, len) = abstract_addr(name);
    let budget = WAIT_MS.load(Ordering::Relaxed);
    let mut waited = 0u32;
    let mut interrupted = 0;
    loop {
        match sys::sys_connect(s.as_raw_fd(), &addr[..len]) {
            Ok(()) | Err(libc::EISCONN) => return Ok(s),
            Err(libc::EINTR) if interrupted < 16 => interrupted += 1,
            Err(libc::EAGAIN) | Err(libc::EINPROGRESS) => return Err(Error::Timeout),
            // No listener: graftd is down or restarting. Counted in sleeps,
            // not clock time (each attempt itself is immediate).
            Err(libc::ECONNREFUSED) if waited < budget => {
                let step = RETRY_MS.min(budget - waited);
                sys::sys_sleep_ms(step);
                waited += step;
            }
            Err(e) => return Err(Error::Unreachable(e)),
        }
    }
}

/// `sockaddr_un` for the abstract name "\0" + `name` (callers bound the
/// name to 100 bytes; longer names are cut).
fn abstract_addr(name: &str) -> ([u8; 110], usize) {
    let mut a = [0u8; 110];
    a[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    let n = name.len().min(a.len() - 3);
    a[3..3 + n].copy_from_slice(&name.as_bytes()[..n]);
    (a, 3 + n)
}

/// One request/reply pair on `fd`.
fn exchange(fd: RawFd, req: &[u8]) -> Result<Answer, Error> {
    match sys::sys_send(fd, req) {
        Ok(n) if n == req.len() => {}
        Ok(_) => return Err(Error::Protocol("short send")),
        Err(libc::EAGAIN) => return Err(Error::Timeout),
        Err(e) => return Err(Error::Io(e)),
    }
    receive(fd, 0)
}

/// One reply on `fd` (`flags`: MSG_DONTWAIT or 0; either way a reply not
/// there in time is [`Error::Timeout`]).
fn receive(fd: RawFd, flags: c_int) -> Result<Answer, Error> {
    let mut buf = [0u8; REPLY_LEN + 1];
    let r = sys::sys_recv_fd(fd, &mut buf, flags).map_err(|e| {
        if e == libc::EAGAIN {
            Error::Timeout
        } else {
            Error::Io(e)
        }
    })?;
    let [first, rest @ ..] = r.fds;
    let mut first = first;
    if r.len == 0 {
        return Err(Error::Io(libc::ECONNRESET));
    }
    if r.flags & libc::MSG_CTRUNC != 0 {
        return Err(Error::NoRoom);
    }
    if r.flags & libc::MSG_TRUNC != 0 || r.len != REPLY_LEN {
        return Err(Error::Protocol("wrong size"));
    }
    let reply = Reply::decode(&buf[..REPLY_LEN]).map_err(|_| Error::Protocol("malformed"))?;
    if reply.errno == 0 && first.is_none() {
        return Err(Error::Protocol("success without a socket"));
    }
    let mut extra: [Option<OwnedFd>; sys::MAX_FDS - 1] = Default::default();
    if reply.errno != 0 {
        first = None;
    } else if reply.op == Op::SocketBatch {
        // Only a batch reply may carry more than one; anything else extra
        // is closed here (dropped with `rest`).
        extra = rest;
    }
    Ok(Answer {
        reply,
        fd: first,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::proto::broker::Reason;
    use nix::sys::socket::{
        recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
        UnixAddr,
    };
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    /// Runs one exchange against a peer that answers with `reply` bytes and
    /// `nfds` descriptors.
    fn answer(reply: Vec<u8>, nfds: usize) -> Result<Answer, Error> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let peer = std::thread::spawn(move || {
            let mut buf = vec![0u8; REQUEST_LEN + 1];
            let n = recv(b.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            assert_eq!(n, REQUEST_LEN);
            let files: Vec<std::fs::File> = (0..nfds)
                .map(|_| std::fs::File::open("/dev/null").unwrap())
                .collect();
            let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let c: &[ControlMessage] = if nfds > 0 { &cmsg } else { &[] };
            sendmsg::<UnixAddr>(
                b.as_fd().as_raw_fd(),
                &[IoSlice::new(&reply)],
                c,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        });
        let mut req = [0u8; REQUEST_LEN];
        Request::new(
            Op::Socket,
            graft_core::EndpointName::new("ep").unwrap(),
            libc::AF_INET,
            libc::SOCK_STREAM,
            0,
            graft_core::proto::broker::Purpose::Egress,
        )
        .encode(&mut req);
        let r = exchange(a.as_raw_fd(), &req);
        peer.join().unwrap();
        r
    }

    fn encoded(r: Reply) -> Vec<u8> {
        let mut b = [0u8; REPLY_LEN];
        r.encode(&mut b);
        b.to_vec()
    }

    #[test]
    fn success_carries_the_socket_close_on_exec() {
        let a = answer(
            encoded(Reply::ok(Op::Socket, &[2, 0, 0, 80, 127, 0, 0, 1])),
            3,
        )
        .unwrap();
        assert_eq!(a.reply.errno, 0);
        let fd = a.fd.expect("the socket");
        let flags = sys::sys_fcntl(fd.as_raw_fd(), libc::F_GETFD, 0).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received close-on-exec");
        assert!(
            a.extra.iter().all(Option::is_none),
            "not a batch: extras closed"
        );
    }

    #[test]
    fn a_batch_reply_keeps_every_socket() {
        let a = answer(
            encoded(Reply::ok(Op::SocketBatch, &[2, 0, 0, 80, 127, 0, 0, 1])),
            sys::MAX_FDS + 2,
        )
        .unwrap();
        assert!(a.fd.is_some());
        assert_eq!(
            a.extra.iter().filter(|f| f.is_some()).count(),
            sys::MAX_FDS - 1,
            "a batch kept, 2 closed"
        );
        for f in a.extra.iter().flatten() {
            let flags = sys::sys_fcntl(f.as_raw_fd(), libc::F_GETFD, 0).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
    }

    #[test]
    fn bad_replies_are_rejected() {
        assert_eq!(
            answer(encoded(Reply::ok(Op::Socket, &[])), 0).err(),
            Some(Error::Protocol("success without a socket"))
        );
        let mut long = encoded(Reply::ok(Op::Socket, &[]));
        long.push(0);
        assert_eq!(answer(long, 1).err(), Some(Error::Protocol("wrong size")));
        let mut bad = encoded(Reply::ok(Op::Socket, &[]));
        bad[0] ^= 0xff;
        assert_eq!(answer(bad, 1).err(), Some(Error::Protocol("malformed")));
        assert_eq!(answer(vec![], 0).err(), Some(Error::Io(libc::ECONNRESET)));
    }

    #[test]
    fn failure_reply_drops_any_descriptor() {
        let a = answer(
            encoded(Reply::err(Op::Socket, libc::EPERM, Reason::OptionRefused)),
            1,
        )
        .unwrap();
        assert_eq!(a.reply.errno, libc::EPERM);
        assert!(a.fd.is_none());
    }

    #[test]
    fn no_broker_is_unreachable() {
        set_wait_ms(0);
        assert!(matches!(
            connect("graft-test/nobody-listens-here"),
            Err(Error::Unreachable(libc::ECONNREFUSED))
        ));
    }
}
