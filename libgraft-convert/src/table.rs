//! Per-descriptor state, without locks, without the allocator and without a
//! fixed descriptor limit.
//!
//! A static directory of 2^18 page pointers (zero-initialized, so it costs
//! address space in .bss, not memory) points at pages of 4096 entries that
//! are mapped on first use with mmap(2) and installed with compare-exchange
//! (the loser of a race unmaps its page). Reading an entry is one or two
//! relaxed atomic loads; descriptors at or above 2^30 are not tracked and read
//! as [`UNKNOWN`] (they are classified again on every decision).
//!
//! Besides the state, an entry remembers what our own `socket()` saw (the
//! socket's kind) and which options of `graft_core::sockopt::SNAPSHOT` the
//! application set through our `setsockopt()` since. That record is trusted
//! only while it is the socket's whole history: it is dropped when the
//! socket may have been changed through another descriptor (a `dup`, or a
//! `fork` that left a copy in another process), and a socket with no
//! trustworthy record gets the full comparison with a fresh socket.

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use libc::c_int;

use crate::sys;

/// Never seen, or closed: classified lazily when it matters.
pub const UNKNOWN: u32 = 0;
/// An AF_INET/AF_INET6 stream or datagram socket, not decided yet.
pub const CANDIDATE: u32 = 1;
/// Left on the container's stack (no rule, excluded, bound locally, accepted).
pub const LOCAL: u32 = 2;
/// Replaced by a host socket for a `bind()`/`listen()`.
pub const INGRESS: u32 = 3;
/// Replaced by a host socket for a `connect()`/`sendto()`.
pub const EGRESS: u32 = 4;
/// Bound locally to `ADDR:0`: a client's bind, or a server decided at `listen()`.
pub const PORT0: u32 = 5;
/// An INET listener replaced by a host unix listener (`type unix`
/// endpoint); the address is the one the application bound.
pub const UNIX_LISTEN: u32 = 6;
/// A connection accepted on a [`UNIX_LISTEN`] socket; the address is the
/// listener's (what the application sees as its local address).
pub const UNIX_PEER: u32 = 7;
/// An INET client socket replaced by a host unix socket connected to a
/// `type unix` endpoint; the address is the destination it asked for.
pub const UNIX_OUT: u32 = 8;
/// A host socket of a catch-all egress endpoint from the start, not
/// connected yet (see `early`); the address words hold the endpoint's name.
pub const EARLY: u32 = 9;

/// Whether `st` is one of the unix-backed states, where the application
/// still believes it holds an AF_INET/AF_INET6 TCP socket.
#[inline(always)]
pub fn is_unix(st: u32) -> bool {
    matches!(st, UNIX_LISTEN | UNIX_PEER | UNIX_OUT)
}

const PAGE_BITS: u32 = 12;
const DIR_BITS: u32 = 18;
const PAGE_LEN: usize = 1 << PAGE_BITS;
/// First descriptor that is not tracked.
pub const LIMIT: c_int = 1 << (PAGE_BITS + DIR_BITS);

/// Room for the address the application asked for (a `sockaddr_in6`).
pub const ADDR_WORDS: usize = 7;

#[repr(C)]
pub struct Entry {
    state: AtomicU32,
    addr: [AtomicU32; ADDR_WORDS],
    /// Family, type and protocol packed by `decide::pack_kind` (0: not known).
    kind: AtomicU32,
    /// The fork generation when our `socket()` made it; 0 when the option
    /// record below is not the socket's whole history.
    hist: AtomicU32,
    /// Bit i (word i / 64): the application set `SNAPSHOT[i]` (only
    /// successful calls).
    opts: [AtomicU64; 2],
}

// One bit per option of the snapshot list.
const _: () = assert!(graft_core::sockopt::SNAPSHOT.len() <= 128);

fn load_opts(e: &Entry) -> u128 {
    u128::from(e.opts[0].load(Ordering::Relaxed))
        | u128::from(e.opts[1].load(Ordering::Relaxed)) << 64
}

fn store_opts(e: &Entry, v: u128) {
    e.opts[0].store(v as u64, Ordering::Relaxed);
    e.opts[1].store((v >> 64) as u64, Ordering::Relaxed);
}

/// Bumped after every fork() (in parent and child): sockets made before it
/// may be shared with the other process, which can set options on them
/// behind this process's back.
static FORK_GEN: AtomicU32 = AtomicU32::new(1);

#[repr(C)]
struct Page {
    entries: [Entry; PAGE_LEN],
}

static DIR: [AtomicPtr<Page>; 1 << DIR_BITS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; 1 << DIR_BITS];

fn split(fd: c_int) -> Option<(usize, usize)> {
    if !(0..LIMIT).contains(&fd) {
        return None;
    }
    let fd = fd as usize;
    Some((fd >> PAGE_BITS, fd & (PAGE_LEN - 1)))
}

fn entry(fd: c_int, alloc: bool) -> Option<&'static Entry> {
    let (d, i) = split(fd)?;
    let slot = &DIR[d];
    let mut page = slot.load(Ordering::Acquire);
    if page.is_null() {
        if !alloc {
            return None;
        }
        let size = std::mem::size_of::<Page>();
        let fresh = sys::sys_mmap(size)?.cast::<Page>();
        match slot.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => page = fresh,
            Err(winner) => {
                // SAFETY: `fresh` was mapped just above and never published.
                unsafe { sys::sys_munmap(fresh.cast(), size) };
                page = winner;
            }
        }
    }
    // SAFETY: pages are mapped zeroed (a valid all-UNKNOWN page), published
    // once and never unmapped, so the reference lives for the process.
    let page: &'static Page = unsafe { &*page };
    Some(&page.entries[i])
}

/// The state of `fd` (one or two relaxed loads).
#[inline]
pub fn state(fd: c_int) -> u32 {
    match entry(fd, false) {
        Some(e) => e.state.load(Ordering::Relaxed),
        None => UNKNOWN,
    }
}

/// Sets the state of `fd` (maps a page if needed; untracked fds are ignored).
pub fn set(fd: c_int, st: u32) {
    if let Some(e) = entry(fd, st != UNKNOWN) {
        e.state.store(st, Ordering::Relaxed);
    }
}

/// Sets the state and the remembered address.
pub fn set_with_addr(fd: c_int, st: u32, addr: &[u8; ADDR_WORDS * 4]) {
    if let Some(e) = entry(fd, true) {
        for (w, c) in e.addr.iter().zip(addr.chunks_exact(4)) {
            w.store(
                u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
                Ordering::Relaxed,
            );
        }
        e.state.store(st, Ordering::Release);
    }
}

/// The remembered address of `fd`.
pub fn addr(fd: c_int) -> [u8; ADDR_WORDS * 4] {
    let mut out = [0u8; ADDR_WORDS * 4];
    if let Some(e) = entry(fd, false) {
        for (w, c) in e.addr.iter().zip(out.chunks_exact_mut(4)) {
            c.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
    }
    out
}

/// Forgets `fd` (close). No allocation when the page does not exist.
#[inline]
pub fn reset(fd: c_int) {
    if let Some(e) = entry(fd, false) {
        e.state.store(UNKNOWN, Ordering::Relaxed);
        e.kind.store(0, Ordering::Relaxed);
        e.hist.store(0, Ordering::Relaxed);
        store_opts(e, 0);
    }
}

/// Our `socket()` just made `fd`: state `st`, packed `kind` (0: not
/// known), no option set yet, history complete as of this fork generation.
pub fn created(fd: c_int, st: u32, kind: u32) {
    if let Some(e) = entry(fd, true) {
        store_opts(e, 0);
        e.kind.store(kind, Ordering::Relaxed);
        e.hist
            .store(FORK_GEN.load(Ordering::Relaxed), Ordering::Relaxed);
        e.state.store(st, Ordering::Release);
    }
}

/// The packed kind our `socket()` recorded for `fd` (0: not known).
pub fn kind(fd: c_int) -> u32 {
    entry(fd, false).map_or(0, |e| e.kind.load(Ordering::Relaxed))
}

/// Records that the application set option `bit` on `fd`. Never maps a
/// page: an fd without one has no record worth keeping.
#[inline]
pub fn record_opt(fd: c_int, bit: u32) {
    if let Some(e) = entry(fd, false) {
        let bit = bit & 127;
        e.opts[(bit / 64) as usize].fetch_or(1u64 << (bit % 64), Ordering::Relaxed);
    }
}

/// The options the application set on `fd`, if that record is the
/// socket's whole history (made by our `socket()` in this fork generation
/// and never duplicated since).
pub fn recorded_opts(fd: c_int) -> Option<u128> {
    let e = entry(fd, false)?;
    let h = e.hist.load(Ordering::Relaxed);
    (h != 0 && h == FORK_GEN.load(Ordering::Relaxed)).then(|| load_opts(e))
}

/// The kind and option record of `fd` can no longer be trusted.
pub fn forget_history(fd: c_int) {
    if let Some(e) = entry(fd, false) {
        e.kind.store(0, Ordering::Relaxed);
        e.hist.store(0, Ordering::Relaxed);
    }
}

/// Called after fork() in parent and child (pthread_atfork): every socket
/// made before may now be changed from the other process.
pub fn forked() {
    let g = FORK_GEN.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    if g == 0 {
        // 0 means "no history": skip it.
        FORK_GEN.store(1, Ordering::Relaxed);
    }
}

/// `to` now refers to the same socket as `from` (dup, dup2, dup3, F_DUPFD).
pub fn copy(from: c_int, to: c_int) {
    let Some(src) = entry(from, false).filter(|e| e.state.load(Ordering::Relaxed) != UNKNOWN)
    else {
        reset(to);
        return;
    };
    let st = src.state.load(Ordering::Relaxed);
    let a = addr(from);
    let kind = src.kind.load(Ordering::Relaxed);
    let opts = load_opts(src);
    // Options set through one descriptor are recorded on that descriptor
    // only, so from now on neither record is the socket's whole history:
    // a graft of either one compares with a fresh socket instead.
    src.hist.store(0, Ordering::Relaxed);
    if let Some(e) = entry(to, true) {
        e.kind.store(kind, Ordering::Relaxed);
        store_opts(e, opts);
        e.hist.store(0, Ordering::Relaxed);
    }
    set_with_addr(to, st, &a);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_pages_and_limits() {
        assert_eq!(state(100_000), UNKNOWN);
        set(100_000, EGRESS);
        assert_eq!(state(100_000), EGRESS);
        assert_eq!(state(100_001), UNKNOWN);
        let mut a = [0u8; 28];
        a[0] = 10;
        a[27] = 7;
        set_with_addr(5, INGRESS, &a);
        copy(5, 9_000_000);
        assert_eq!(state(9_000_000), INGRESS);
        assert_eq!(addr(9_000_000), a);
        reset(9_000_000);
        assert_eq!(state(9_000_000), UNKNOWN);
        set(LIMIT, LOCAL);
        assert_eq!(state(LIMIT), UNKNOWN, "fds >= 2^30 are not tracked");
        set(-1, LOCAL);
        assert_eq!(state(-1), UNKNOWN);
        set(LIMIT - 1, LOCAL);
        assert_eq!(state(LIMIT - 1), LOCAL);
    }

    #[test]
    fn option_record_lives_until_dup_fork_or_close() {
        let fd = 200_000;
        created(fd, CANDIDATE, 0x0201_0006);
        assert_eq!(recorded_opts(fd), Some(0));
        record_opt(fd, 5);
        record_opt(fd, 63);
        record_opt(fd, 64);
        record_opt(fd, 127);
        assert_eq!(
            recorded_opts(fd),
            Some(1 << 5 | 1 << 63 | 1 << 64 | 1 << 127)
        );
        assert_eq!(kind(fd), 0x0201_0006);
        // A duplicate carries state, kind and bits, but neither record is
        // complete any more.
        copy(fd, fd + 1);
        assert_eq!(state(fd + 1), CANDIDATE);
        assert_eq!(kind(fd + 1), 0x0201_0006);
        assert_eq!(recorded_opts(fd + 1), None);
        assert_eq!(recorded_opts(fd), None);
        // socket() reusing the number starts a fresh, complete record.
        created(fd, CANDIDATE, 0x0201_0006);
        record_opt(fd, 1);
        assert_eq!(recorded_opts(fd), Some(1 << 1));
        forked();
        assert_eq!(recorded_opts(fd), None, "shared with another process");
        created(fd, CANDIDATE, 0x0201_0006);
        assert_eq!(recorded_opts(fd), Some(0));
        reset(fd);
        assert_eq!((state(fd), kind(fd), recorded_opts(fd)), (UNKNOWN, 0, None));
        // Never mapped: nothing recorded, nothing allocated.
        record_opt(LIMIT - 5, 3);
        assert_eq!(recorded_opts(LIMIT - 5), None);
    }
}
