//! The per-process pool of pre-made egress sockets.
//!
//! A client that opens a connection per request would pay one broker round
//! trip per connection. An egress socket without options is the same for
//! every such connection, so one `SocketBatch` request brings up to
//! [`BATCH_MAX`] of them: one is used at once, the rest wait here for the
//! next grafts of the same (network namespace, endpoint, family, type,
//! protocol): endpoint names are per namespace, and a thread that called
//! setns() must never get a socket of its old namespace's endpoint.
//!
//! Storage is static: [`KEYS`] keys of [`BATCH_MAX`] descriptors each, in
//! atomics, so the pool never allocates and never grows the descriptor
//! count past `KEYS * BATCH_MAX`; a fifth key goes without a pool. An atomic
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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use graft_core::proto::broker::{Op, Reply, Request, BATCH_MAX};

use crate::broker::{self, Answer, Error, PidLock};
use crate::sys;

/// Most (endpoint, kind) keys with a pool.
pub const KEYS: usize = 4;

static LOCK: PidLock = PidLock::new();
/// pid of the process whose sockets the slots hold.
static OWNER: AtomicI32 = AtomicI32::new(0);
/// The endpoint name of each key, NUL-padded, as two words.
static NAME: [[AtomicU64; 2]; KEYS] = [const { [const { AtomicU64::new(0) }; 2] }; KEYS];
/// The network namespace (device, inode) of each key.
static NS: [[AtomicU64; 2]; KEYS] = [const { [const { AtomicU64::new(0) }; 2] }; KEYS];
/// The packed kind (see `decide::pack_kind`) of each key; 0: key unused.
static KIND: [AtomicU32; KEYS] = [const { AtomicU32::new(0) }; KEYS];
static LEN: [AtomicU32; KEYS] = [const { AtomicU32::new(0) }; KEYS];
static FD: [[AtomicI32; BATCH_MAX]; KEYS] =
    [const { [const { AtomicI32::new(-1) }; BATCH_MAX] }; KEYS];
static INO: [[AtomicU64; BATCH_MAX]; KEYS] =
    [const { [const { AtomicU64::new(0) }; BATCH_MAX] }; KEYS];

/// Like [`broker::ask`] for an egress `Socket` request without options
/// (`kind` packed, not 0) from a thread in namespace `ns`: served from the
/// pool when it has a socket for that key, else by a `SocketBatch` whose
/// other sockets are kept. With `want_addr`, a pooled socket's reply
/// carries its own bound address. An unknown namespace gets no pool.
pub fn ask(
    name: &str,
    req: &Request,
    kind: u32,
    want_addr: bool,
    ns: Option<(u64, u64)>,
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
    ns: (u64, u64),
) -> Result<Answer, Error> {
    if OWNER.load(Ordering::Relaxed) != pid {
        // Inherited without fork handlers: the parent's sockets.
        drain();
        OWNER.store(pid, Ordering::Relaxed);
    }
    let Some(k) = key(req, kind, ns) else {
        return broker::ask(name, req, Some(ns));
    };
    if let Some(fd) = pop(k) {
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
    let mut a = broker::ask(name, &batch, Some(ns))?;
    if a.reply.errno == 0 {
        // One getrlimit per batch, not per socket.
        let floor = broker::high_fd_floor();
        for f in a.extra.iter_mut().filter_map(Option::take) {
            push(k, f, floor);
        }
    }
    Ok(a)
}

fn name_words(req: &Request) -> [u64; 2] {
    let mut b = [0u8; 16];
    let n = req.endpoint.as_bytes();
    let n = &n[..n.len().min(16)];
    b[..n.len()].copy_from_slice(n);
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

/// The key slot for the request from namespace `ns`, claiming a free one
/// if needed.
fn key(req: &Request, kind: u32, ns: (u64, u64)) -> Option<usize> {
    let w = name_words(req);
    let same = |k: usize| {
        KIND[k].load(Ordering::Relaxed) == kind
            && NAME[k][0].load(Ordering::Relaxed) == w[0]
            && NAME[k][1].load(Ordering::Relaxed) == w[1]
            && NS[k][0].load(Ordering::Relaxed) == ns.0
            && NS[k][1].load(Ordering::Relaxed) == ns.1
    };
    if let Some(k) = (0..KEYS).find(|&k| same(k)) {
        return Some(k);
    }
    let k = (0..KEYS).find(|&k| KIND[k].load(Ordering::Relaxed) == 0)?;
    NAME[k][0].store(w[0], Ordering::Relaxed);
    NAME[k][1].store(w[1], Ordering::Relaxed);
    NS[k][0].store(ns.0, Ordering::Relaxed);
    NS[k][1].store(ns.1, Ordering::Relaxed);
    LEN[k].store(0, Ordering::Relaxed);
    KIND[k].store(kind, Ordering::Relaxed);
    Some(k)
}

/// Whether `fd` is still the socket the pool put there.
fn ours(fd: RawFd, ino: u64) -> bool {
    fd >= 0
        && matches!(sys::sys_fstat(fd), Some((i, mode))
            if i == ino && mode & libc::S_IFMT == libc::S_IFSOCK)
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
        if ours(fd, INO[k][i].load(Ordering::Relaxed)) {
            // SAFETY: the pool made this descriptor and the inode check
            // shows the number still refers to that socket; the slot was
            // emptied above, so this is now its only owner.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        // Closed or reused behind the library: not ours to close.
    }
}

/// Keeps `f` at a high number; closed when the key is full or no high
/// number is free.
fn push(k: usize, f: OwnedFd, floor: libc::c_long) {
    let n = LEN[k].load(Ordering::Relaxed) as usize;
    if n >= BATCH_MAX {
        return;
    }
    let Ok(hi) = sys::sys_fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) else {
        return;
    };
    drop(f);
    let Some((ino, _)) = sys::sys_fstat(hi) else {
        sys::sys_close(hi);
        return;
    };
    INO[k][n].store(ino, Ordering::Relaxed);
    FD[k][n].store(hi, Ordering::Relaxed);
    LEN[k].store(n as u32 + 1, Ordering::Relaxed);
}

/// Closes every pooled socket (still ours) and frees every key.
fn drain() {
    for k in 0..KEYS {
        let n = (LEN[k].swap(0, Ordering::Relaxed) as usize).min(BATCH_MAX);
        for i in 0..n {
            let fd = FD[k][i].swap(-1, Ordering::Relaxed);
            if ours(fd, INO[k][i].load(Ordering::Relaxed)) {
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

    #[test]
    fn keys_slots_inodes_and_draining() {
        drain();
        let ns = (4, 4026531840);
        let a = key(&req("a"), 0x0201_0006, ns).unwrap();
        assert_eq!(key(&req("a"), 0x0201_0006, ns), Some(a));
        let b = key(&req("a"), 0x0a01_0006, ns).unwrap();
        assert_ne!(a, b, "another kind is another key");
        let c = key(&req("a"), 0x0201_0006, (4, 4026531841)).unwrap();
        assert!(c != a && c != b, "another namespace is another key");
        key(&req("d"), 1, ns).unwrap();
        assert_eq!(key(&req("e"), 1, ns), None, "all key slots used");

        let floor = broker::high_fd_floor();
        for _ in 0..BATCH_MAX + 2 {
            push(
                a,
                sys::sys_socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap(),
                floor,
            );
        }
        assert_eq!(held(), BATCH_MAX, "a key holds at most one batch");
        let floor = floor as RawFd;
        for slot in &FD[a] {
            let fd = slot.load(Ordering::Relaxed);
            assert!(fd >= floor, "fd {fd} below {floor}");
            let fl = sys::sys_fcntl(fd, libc::F_GETFD, 0).unwrap();
            assert_ne!(fl & libc::FD_CLOEXEC, 0);
        }
        // The top number closed and reused behind the pool's back: skipped,
        // and the impostor is left open.
        let top = FD[a][BATCH_MAX - 1].load(Ordering::Relaxed);
        let other = sys::sys_socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap();
        sys::sys_dup3(other.as_raw_fd(), top, libc::O_CLOEXEC).unwrap();
        let got = pop(a).unwrap();
        assert_ne!(got.as_raw_fd(), top);
        assert_eq!(held(), BATCH_MAX - 2);
        assert!(
            sys::sys_fcntl(top, libc::F_GETFD, 0).is_ok(),
            "impostor kept"
        );
        sys::sys_close(top);
        let rest: Vec<RawFd> = (0..BATCH_MAX - 2)
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
