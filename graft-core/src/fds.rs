//! Closing many descriptors at once.
//!
//! A batch of sockets, sent by graftd or received by the preload library,
//! sits at numbers the kernel gave one after the other: usually one run or
//! a few, each of which one `close_range` (Linux 5.9) closes instead of a
//! `close` per socket. No allocation: the library calls this in the
//! application's thread.

use std::os::fd::RawFd;

/// Closes every descriptor of `fds` (sorted here, in place), which the
/// caller owns and gives up: runs of consecutive numbers with one
/// `close_range` each, single numbers (and runs on a kernel without
/// `close_range`) with `close`. Nothing between the given numbers is
/// touched.
pub fn close_runs(fds: &mut [RawFd]) {
    fds.sort_unstable();
    let mut i = 0;
    while i < fds.len() {
        let mut j = i;
        while j + 1 < fds.len() && fds[j + 1] == fds[j] + 1 {
            j += 1;
        }
        // SAFETY: [fds[i], fds[j]] is filled by distinct descriptors the
        // caller owns, so the range holds no other; no pointers.
        let ranged =
            j > i && unsafe { libc::syscall(libc::SYS_close_range, fds[i], fds[j], 0) } == 0;
        if !ranged {
            for &fd in &fds[i..=j] {
                // The raw call, not libc's `close`: inside the preload
                // library that symbol is the library's own wrapper.
                // SAFETY: a descriptor the caller owns, closed once.
                unsafe { libc::syscall(libc::SYS_close, fd) };
            }
        }
        i = j + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{IntoRawFd, OwnedFd};

    /// Runs of numbers are closed together, single ones alone, and nothing
    /// between them is touched: another test's thread may take a closed
    /// number at once, so "closed" is "no longer the same socket".
    #[test]
    fn close_runs_closes_exactly_the_given_numbers() {
        let socks: Vec<RawFd> = (0..7)
            .map(|_| OwnedFd::from(std::os::unix::net::UnixDatagram::unbound().unwrap()))
            .map(IntoRawFd::into_raw_fd)
            .collect();
        let ino = |fd: RawFd| {
            // SAFETY: an all-zero stat is a valid value to be overwritten.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: st is a writable stat.
            (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
        };
        let before: Vec<_> = socks.iter().map(|&fd| ino(fd)).collect();
        // Keep the third and the sixth; close the rest, given out of order.
        let mut mine = [socks[4], socks[0], socks[1], socks[3], socks[6]];
        close_runs(&mut mine);
        for (i, &fd) in socks.iter().enumerate() {
            let kept = ino(fd) == before[i];
            assert_eq!(kept, i == 2 || i == 5, "{fd}");
        }
        // SAFETY: the two kept descriptors are still ours.
        unsafe {
            libc::close(socks[2]);
            libc::close(socks[5]);
        }
    }
}
