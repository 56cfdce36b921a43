//! The per-process pool of pre-made egress sockets.
//!
//! A client that opens a connection per request would pay one broker round
//! trip per connection. An egress socket without options is the same for
//! every such connection, so one `SocketBatch` request brings up to
//! [`BATCH_MAX`] of them: one is used at once, the rest wait here for the
//! next grafts of the same (network namespace, endpoint, family, type,
//! protocol): endpoint names are per namespace, and a socket of one
//! namespace (a thread that called setns() makes them) must never be
//! replaced by a socket of another namespace's endpoint.
//!
//! A key that keeps being used (it has had two batches) asks for its next
//! batch ahead, when it is down to [`AHEAD_AT`] sockets, on the pool's own
//! broker connection, and goes on serving what it holds; the reply is
//! picked up without waiting by a later request, or waited for by one that
//! finds the key empty. So graftd makes the next sockets while the program
//! runs, on the other CPU, instead of the program stopping for a round trip
//! every batch; a failed batch fetched ahead is dropped and the next request
//! that finds the key empty asks again and reports the failure.
//!
//! Storage is static: [`KEYS`] keys of [`CAP`] descriptors each (the end
//! of one batch and the whole next one), in atomics, so the pool never
//! allocates and never grows the descriptor count past `KEYS * CAP`; a
//! fifth key goes without a pool. An atomic
//! try-lock holding the owner's pid guards it: a thread or signal handler
//! that finds it busy asks the broker for one socket as if there were no
//! pool, so nobody waits. Pooled descriptors are close-on-exec and live at
//! high numbers (never the application's low ones), and each remembers its
//! inode: a number the application closed or reused behind the library
//! (close_range, a dup2 onto it) is forgotten, never closed or handed out.
//! After fork() the child closes its copies at once (otherwise a connection
//! the parent later makes on one of them would stay open in the child after
//! the parent closes it); a child made without fork handlers (vfork, clone)
//! that grafts finds the parent's pid on the pool and does the same.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use graft_core::proto::broker::{Op, Reply, Request, BATCH_MAX, REQUEST_LEN};
use graft_core::EndpointName;

use crate::broker::{self, Answer, Conn, Error, PidLock};
use crate::sys;

/// Most (endpoint, kind) keys with a pool.
pub const KEYS: usize = 4;
/// Sockets one key holds: the rest of a batch plus the next one, fetched
/// ahead while the last few of the previous are used.
const CAP: usize = 2 * BATCH_MAX;
/// A key with this many sockets left or fewer asks for its next batch
/// ahead, once the process has shown it churns (see [`BATCHES_BEFORE_AHEAD`]).
const AHEAD_AT: usize = BATCH_MAX / 4;
/// Batches a key must have received before it fetches ahead: a process that
/// opens a few connections never holds more than a batch.
const BATCHES_BEFORE_AHEAD: u32 = 2;

static LOCK: PidLock = PidLock::new();
/// The pool's own broker connection: a batch fetched ahead is owed on it
/// while the application's other requests use the shared one.
static CONN: Conn = Conn::new();
/// pid of the process whose sockets the slots hold.
static OWNER: AtomicI32 = AtomicI32::new(0);
/// The endpoint name of each key, NUL-padded, as two words.
static NAME: [[AtomicU64; 2]; KEYS] = [const { [const { AtomicU64::new(0) }; 2] }; KEYS];
/// The network namespace key of each key.
static NS: [AtomicU64; KEYS] = [const { AtomicU64::new(0) }; KEYS];
/// The packed kind (see `decide::pack_kind`) of each key; 0: key unused.
static KIND: [AtomicU32; KEYS] = [const { AtomicU32::new(0) }; KEYS];
static LEN: [AtomicU32; KEYS] = [const { AtomicU32::new(0) }; KEYS];
/// Batches received for each key since it was claimed.
static BATCHES: [AtomicU32; KEYS] = [const { AtomicU32::new(0) }; KEYS];
static FD: [[AtomicI32; CAP]; KEYS] = [const { [const { AtomicI32::new(-1) }; CAP] }; KEYS];
static INO: [[AtomicU64; CAP]; KEYS] = [const { [const { AtomicU64::new(0) }; CAP] }; KEYS];

/// Like [`broker::ask`] for an egress `Socket` request without options
/// (`kind` packed, not 0) for a socket of namespace `ns`: served from the
/// pool when it has a socket for that key, else by a `SocketBatch` whose
/// other sockets are kept. With `want_addr`, a pooled socket's reply
/// carries its own bound address. An unknown namespace gets no pool.
pub fn ask(
    name: &str,
    req: &Request,
    kind: u32,
    want_addr: bool,
    ns: Option<u64>,
) -> Result<Answer, Error> {
    let pid = sys::sys_getpid();
    let Some(ns) = ns else {
        return broker::ask(name, req, None);
    };
    if kind == 0 || req.nopts != 0 || !LOCK.try_lock(pid) {
        return broker::ask(name, req, Some(ns));
    }
    let r = locked(name, req, kind, want_addr, pid, ns);
    LOCK.unlock();
    r
}

fn locked(
    name: &str,
    req: &Request,
    kind: u32,
    want_addr: bool,
    pid: i32,
    ns: u64,
) -> Result<Answer, Error> {
    if OWNER.load(Ordering::Relaxed) != pid {
        // Inherited without fork handlers: the parent's sockets.
        drain();
        OWNER.store(pid, Ordering::Relaxed);
    }
    let Some(k) = key(req, kind, ns) else {
        return broker::ask(name, req, Some(ns));
    };
    if let Some(fd) = serve(k, pid, ns, || req.clone()) {
        let addr = if want_addr {
            match sys::sys_sockname(fd.as_raw_fd(), false) {
                Ok((b, n)) => Reply::ok(Op::Socket, &b[..n]),
                Err(_) => Reply::ok(Op::Socket, &[]),
            }
        } else {
            Reply::ok(Op::Socket, &[])
        };
        return Ok(Answer {
            reply: addr,
            fd: Some(fd),
            extra: Default::default(),
        });
    }
    let mut batch = req.clone();
    batch.op = Op::SocketBatch;
    let mut buf = [0u8; REQUEST_LEN];
    batch.encode(&mut buf);
    let mut a = CONN.ask(name, &buf, pid, ns)?;
    if a.reply.errno == 0 {
        BATCHES[k].fetch_add(1, Ordering::Relaxed);
        keep(k, None, &mut a.extra);
    }
    Ok(a)
}

/// A pooled socket of endpoint `ep` and kind `kind` (packed) for namespace
/// `ns`, if the pool already serves that key and has one or one on its way;
/// never a broker round trip of its own. `req` makes the key's egress
/// `Socket` request (without options), needed only to fetch ahead. For
/// grafting a socket as it is made ([`crate::early`]), where building a
/// request per socket would cost more than the rest of the lookup.
pub fn take_ready(
    ep: &EndpointName,
    kind: u32,
    ns: u64,
    req: impl FnOnce() -> Request,
) -> Option<OwnedFd> {
    let pid = sys::sys_getpid();
    if OWNER.load(Ordering::Relaxed) != pid || !LOCK.try_lock(pid) {
        return None;
    }
    let fd = find(ep, kind, ns).and_then(|k| serve(k, pid, ns, req));
    LOCK.unlock();
    fd
}

/// A socket of key `k` (whose request `req` makes), if it holds one or one
/// is on its way; asks for the next batch ahead when that leaves the key
/// low.
fn serve(k: usize, pid: i32, ns: u64, req: impl FnOnce() -> Request) -> Option<OwnedFd> {
    // A batch fetched ahead that has arrived; when this key is empty, wait
    // for one that is on its way rather than ask again.
    settle(pid, ns, false);
    if LEN[k].load(Ordering::Relaxed) == 0 {
        settle(pid, ns, true);
    }
    let fd = pop(k)?;
    fetch_ahead(k, pid, ns, req);
    Some(fd)
}

/// Asks for key `k`'s next batch without waiting, when it runs low and the
/// process keeps asking. `req` makes the request the key serves.
fn fetch_ahead(k: usize, pid: i32, ns: u64, req: impl FnOnce() -> Request) {
    if LEN[k].load(Ordering::Relaxed) as usize > AHEAD_AT
        || BATCHES[k].load(Ordering::Relaxed) < BATCHES_BEFORE_AHEAD
        || CONN.owed() != 0
    {
        return;
    }
    let mut batch = req();
    batch.op = Op::SocketBatch;
    let mut buf = [0u8; REQUEST_LEN];
    batch.encode(&mut buf);
    CONN.send_ahead(&buf, pid, ns, k as u32 + 1);
}

/// Puts the sockets of a batch fetched ahead into their key once its reply
/// is there (with `wait`, waits for it). A failed one is dropped: the next
/// request that finds its key empty asks again and reports the failure.
fn settle(pid: i32, ns: u64, wait: bool) {
    let tag = CONN.owed();
    if tag == 0 {
        return;
    }
    let Some(Ok(mut a)) = CONN.take_ahead(pid, ns, wait) else {
        return;
    };
    let k = tag as usize - 1;
    if a.reply.errno != 0 || k >= KEYS {
        return;
    }
    BATCHES[k].fetch_add(1, Ordering::Relaxed);
    let first = a.fd.take();
    keep(k, first, &mut a.extra);
}

/// Keeps the sockets of a batch reply (`first`, when it is not used at
/// once, and the spare ones) in key `k`.
fn keep(k: usize, first: Option<OwnedFd>, extra: &mut [Option<OwnedFd>]) {
    // One getrlimit per batch, not per socket.
    let floor = broker::high_fd_floor();
    let mut received = [-1; BATCH_MAX];
    let mut n = 0;
    for f in first
        .into_iter()
        .chain(extra.iter_mut().filter_map(Option::take))
    {
        push(k, f.as_fd(), floor);
        if n < received.len() {
            received[n] = f.into_raw_fd();
            n += 1;
        }
    }
    graft_core::fds::close_runs(&mut received[..n]);
}

fn name_words(ep: &EndpointName) -> [u64; 2] {
    let mut b = [0u8; 16];
    let n = ep.as_bytes();
    let n = &n[..n.len().min(16)];
    b[..n.len()].copy_from_slice(n);
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

/// The key slot already serving endpoint `ep`'s sockets of kind `kind` for
/// namespace `ns`.
fn find(ep: &EndpointName, kind: u32, ns: u64) -> Option<usize> {
    let w = name_words(ep);
    (0..KEYS).find(|&k| {
        KIND[k].load(Ordering::Relaxed) == kind
            && NAME[k][0].load(Ordering::Relaxed) == w[0]
            && NAME[k][1].load(Ordering::Relaxed) == w[1]
            && NS[k].load(Ordering::Relaxed) == ns
    })
}

/// The key slot for the request for a socket of namespace `ns`, claiming a
/// free one if needed.
fn key(req: &Request, kind: u32, ns: u64) -> Option<usize> {
    if let Some(k) = find(&req.endpoint, kind, ns) {
        return Some(k);
    }
    let w = name_words(&req.endpoint);
    let k = (0..KEYS).find(|&k| KIND[k].load(Ordering::Relaxed) == 0)?;
    NAME[k][0].store(w[0], Ordering::Relaxed);
    NAME[k][1].store(w[1], Ordering::Relaxed);
    NS[k].store(ns, Ordering::Relaxed);
    LEN[k].store(0, Ordering::Relaxed);
    BATCHES[k].store(0, Ordering::Relaxed);
    KIND[k].store(kind, Ordering::Relaxed);
    Some(k)
}

fn pop(k: usize) -> Option<OwnedFd> {
    loop {
        let n = LEN[k].load(Ordering::Relaxed) as usize;
        if n == 0 {
            return None;
        }
        let i = n - 1;
        LEN[k].store(i as u32, Ordering::Relaxed);
        let fd = FD[k][i].swap(-1, Ordering::Relaxed);
        if sys::sys_is_socket(fd, INO[k][i].load(Ordering::Relaxed)) {
            // SAFETY: the pool made this descriptor and the inode check
            // shows the number still refers to that socket; the slot was
            // emptied above, so this is now its only owner.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        // Closed or reused behind the library: not ours to close.
    }
}

/// Keeps a copy of `f` at a high number, unless the key is full or no
/// high number is free (the caller closes `f`).
fn push(k: usize, f: BorrowedFd<'_>, floor: libc::c_long) {
    let n = LEN[k].load(Ordering::Relaxed) as usize;
    if n >= CAP {
        return;
    }
    let Ok(hi) = sys::sys_fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) else {
        return;
    };
    let Some((ino, _)) = sys::sys_fstat(hi) else {
        sys::sys_close(hi);
        return;
    };
    INO[k][n].store(ino, Ordering::Relaxed);
    FD[k][n].store(hi, Ordering::Relaxed);
    LEN[k].store(n as u32 + 1, Ordering::Relaxed);
}

/// Closes every pooled socket (still ours) and the pool's broker
/// connection, and frees every key.
fn drain() {
    CONN.forget_inherited();
    for k in 0..KEYS {
        let n = (LEN[k].swap(0, Ordering::Relaxed) as usize).min(CAP);
        for i in 0..n {
            let fd = FD[k][i].swap(-1, Ordering::Relaxed);
            if sys::sys_is_socket(fd, INO[k][i].load(Ordering::Relaxed)) {
                sys::sys_close(fd);
            }
        }
        KIND[k].store(0, Ordering::Relaxed);
    }
}

/// In the child after fork() (single-threaded): the pooled sockets are the
/// parent's, closed here so they never outlive the parent's use of them.
/// Only system calls: valid in a child of a multi-threaded parent.
pub fn forked_child() {
    drain();
    OWNER.store(sys::sys_getpid(), Ordering::Relaxed);
    LOCK.unlock();
}

/// How many sockets the pool holds (tests).
#[cfg(test)]
fn held() -> usize {
    (0..KEYS)
        .map(|k| LEN[k].load(Ordering::Relaxed) as usize)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::proto::broker::Purpose;
    use graft_core::EndpointName;
    use std::os::fd::RawFd;

    fn req(ep: &str) -> Request {
        Request::new(
            Op::Socket,
            EndpointName::new(ep).unwrap(),
            libc::AF_INET,
            libc::SOCK_STREAM,
            libc::IPPROTO_TCP,
            Purpose::Egress,
        )
    }

    /// The pool's state is process-wide: one test at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stand-in broker on the abstract name `name`: answers every request
    /// on every connection with a `SocketBatch` of the next size from
    /// `sizes`, the third reply only once `release` says so. Counts the
    /// requests in `seen`.
    fn fake_broker(
        name: &str,
        sizes: Vec<usize>,
        seen: std::sync::Arc<AtomicU32>,
        release: std::sync::mpsc::Receiver<()>,
    ) {
        use nix::sys::socket::{
            accept, bind, listen, recv, sendmsg, socket, AddressFamily, Backlog, ControlMessage,
            MsgFlags, SockFlag, SockType, UnixAddr,
        };
        let l = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            l.as_raw_fd(),
            &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
        )
        .unwrap();
        listen(&l, Backlog::new(8).unwrap()).unwrap();
        std::thread::spawn(move || {
            let c = accept(l.as_raw_fd()).unwrap();
            let mut buf = [0u8; REQUEST_LEN + 1];
            for (i, n) in sizes.into_iter().enumerate() {
                if recv(c, &mut buf, MsgFlags::empty()).unwrap_or(0) == 0 {
                    return;
                }
                seen.fetch_add(1, Ordering::SeqCst);
                if i == 2 {
                    release.recv().unwrap();
                }
                let socks: Vec<OwnedFd> = (0..n)
                    .map(|_| sys::sys_socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap())
                    .collect();
                let raw: Vec<RawFd> = socks.iter().map(|f| f.as_raw_fd()).collect();
                let mut r = [0u8; graft_core::proto::broker::REPLY_LEN];
                Reply::ok(Op::SocketBatch, &[]).encode(&mut r);
                let iov = [std::io::IoSlice::new(&r)];
                sendmsg::<UnixAddr>(
                    c,
                    &iov,
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::empty(),
                    None,
                )
                .unwrap();
            }
            sys::sys_close(c);
        });
    }

    /// Once a key has had two batches, it asks for the next one while it
    /// still holds AHEAD_AT sockets, keeps serving from what it holds while
    /// the reply is on its way, and takes that reply instead of asking again.
    #[test]
    fn a_churning_key_fetches_its_next_batch_ahead() {
        let _g = serial();
        drain();
        let name = format!("graft-test/pool-ahead/{}", std::process::id());
        let seen = std::sync::Arc::new(AtomicU32::new(0));
        let (go, release) = std::sync::mpsc::channel();
        fake_broker(
            &name,
            vec![8, 16, BATCH_MAX, BATCH_MAX],
            seen.clone(),
            release,
        );
        let probe = sys::sys_socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        let ns = sys::sys_netns_key(probe.as_raw_fd());
        let kind = 0x0201_0006;
        let take = |i: usize| {
            let a = ask(&name, &req("ep-ahead"), kind, false, ns)
                .unwrap_or_else(|e| panic!("connection {i}: {e:?}"));
            assert_eq!(a.reply.errno, 0);
            a.fd.expect("a socket")
        };
        let wait_seen = |n: u32| {
            for _ in 0..500 {
                if seen.load(Ordering::SeqCst) >= n {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            seen.load(Ordering::SeqCst)
        };
        // 8, then 16: one request each, made when the key is empty.
        for i in 0..8 {
            drop(take(i));
        }
        assert_eq!((seen.load(Ordering::SeqCst), held()), (1, 0));
        // The second batch used down to AHEAD_AT: the third is asked ahead.
        for i in 8..24 - AHEAD_AT {
            drop(take(i));
            if held() > AHEAD_AT {
                assert_eq!(wait_seen(2), 2, "connection {i}");
            }
        }
        assert_eq!(held(), AHEAD_AT);
        assert_eq!(wait_seen(3), 3, "the third batch asked ahead");
        // Its reply is held back: the sockets left are still served.
        for i in 24 - AHEAD_AT..24 {
            drop(take(i));
        }
        assert_eq!(held(), 0);
        assert_eq!(
            seen.load(Ordering::SeqCst),
            3,
            "no request while one is owed"
        );
        go.send(()).unwrap();
        // The empty key waits for the owed batch rather than asking again.
        drop(take(24));
        assert_eq!((seen.load(Ordering::SeqCst), held()), (3, BATCH_MAX - 1));
        drain();
    }

    #[test]
    fn keys_slots_inodes_and_draining() {
        let _g = serial();
        drain();
        let ns = 4026531840;
        let a = key(&req("a"), 0x0201_0006, ns).unwrap();
        assert_eq!(key(&req("a"), 0x0201_0006, ns), Some(a));
        let b = key(&req("a"), 0x0a01_0006, ns).unwrap();
        assert_ne!(a, b, "another kind is another key");
        let c = key(&req("a"), 0x0201_0006, 4026531841).unwrap();
        assert!(c != a && c != b, "another namespace is another key");
        key(&req("d"), 1, ns).unwrap();
        assert_eq!(key(&req("e"), 1, ns), None, "all key slots used");

        let floor = broker::high_fd_floor();
        for _ in 0..CAP + 2 {
            push(
                a,
                sys::sys_socket(libc::AF_INET, libc::SOCK_STREAM, 0)
                    .unwrap()
                    .as_fd(),
                floor,
            );
        }
        assert_eq!(held(), CAP, "a key holds at most two batches");
        let floor = floor as RawFd;
        for slot in &FD[a] {
            let fd = slot.load(Ordering::Relaxed);
            assert!(fd >= floor, "fd {fd} below {floor}");
            let fl = sys::sys_fcntl(fd, libc::F_GETFD, 0).unwrap();
            assert_ne!(fl & libc::FD_CLOEXEC, 0);
        }
        // The top number closed and reused behind the pool's back: skipped,
        // and the impostor is left open.
        let top = FD[a][CAP - 1].load(Ordering::Relaxed);
        let other = sys::sys_socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap();
        sys::sys_dup3(other.as_raw_fd(), top, libc::O_CLOEXEC).unwrap();
        let got = pop(a).unwrap();
        assert_ne!(got.as_raw_fd(), top);
        assert_eq!(held(), CAP - 2);
        assert!(
            sys::sys_fcntl(top, libc::F_GETFD, 0).is_ok(),
            "impostor kept"
        );
        sys::sys_close(top);
        let rest: Vec<RawFd> = (0..CAP - 2)
            .map(|i| FD[a][i].load(Ordering::Relaxed))
            .collect();
        drain();
        assert_eq!(held(), 0);
        for fd in rest {
            assert_eq!(sys::sys_fcntl(fd, libc::F_GETFD, 0), Err(libc::EBADF));
        }
        assert_eq!(key(&req("e"), 1, ns), Some(0), "keys freed");
        drain();
    }
}
