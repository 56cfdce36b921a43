//! Per-descriptor state, without locks, without the allocator and without a
//! fixed descriptor limit.
//!
//! A static directory of 2^18 page pointers (zero-initialized, so it costs
//! address space in .bss, not memory) points at pages of 4096 entries that
//! are mapped on first use with mmap(2) and installed with compare-exchange
//! (the loser of a race unmaps its page). Reading an entry is one or two
//! relaxed atomic loads; descriptors at or above 2^30 are not tracked and read
//! as [`UNKNOWN`] (they are classified again on every decision).

use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

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
}

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
    }
}

/// `to` now refers to the same socket as `from` (dup, dup2, dup3, F_DUPFD).
pub fn copy(from: c_int, to: c_int) {
    let st = state(from);
    if st == UNKNOWN {
        reset(to);
        return;
    }
    let a = addr(from);
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
}
