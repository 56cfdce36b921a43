//! The seccomp filter the launcher installs before it execs the program.
//!
//! Only the calls that can carry an address graft cares about reach the
//! supervisor: `bind`, `connect`, `sendmsg`, `sendmmsg`, and `sendto` when
//! its address argument is not NULL (a plain `send` on a connected socket
//! costs nothing). Everything else is allowed in the kernel. Calls made
//! through another ABI (i386 `int 0x80`, x32) could reach the same socket
//! code unseen, so they fail with `ENOSYS`: fail closed.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
/// The filter returns a listener fd.
pub const FLAG_NEW_LISTENER: libc::c_ulong = 1 << 3;
/// Once the supervisor received a notification, only a fatal signal
/// interrupts the trapped call (Go preempts its threads with SIGURG every
/// few ms; without this flag such a call would restart forever). Linux 5.19.
pub const FLAG_WAIT_KILLABLE_RECV: libc::c_ulong = 1 << 5;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_ERRNO: u32 = 0x0005_0000;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("graft-seccomp knows the audit arch of x86_64 and aarch64 only");

/// x32 system calls are x86_64 calls with this bit set in `nr`.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Offsets in struct seccomp_data.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

/// The system calls the filter traps (also what graftd dispatches on).
pub const SYS_BIND: i64 = libc::SYS_bind;
pub const SYS_CONNECT: i64 = libc::SYS_connect;
pub const SYS_SENDTO: i64 = libc::SYS_sendto;
pub const SYS_SENDMSG: i64 = libc::SYS_sendmsg;
pub const SYS_SENDMMSG: i64 = libc::SYS_sendmmsg;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter program.
pub fn program() -> Vec<libc::sock_filter> {
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        p.push(jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(stmt(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32));
    }
    // The tail, indexed from its start: the trapped calls, then the sendto
    // address check, then the two verdicts.
    let traps = [SYS_BIND, SYS_CONNECT, SYS_SENDMSG, SYS_SENDMMSG];
    let n = traps.len() as u8;
    // Layout after the trap checks: [n] jeq sendto, [n+1] ld a4 lo,
    // [n+2] jeq 0, [n+3] ld a4 hi, [n+4] jeq 0, [n+5] ALLOW, [n+6] NOTIF.
    let allow = n + 5;
    let notif = n + 6;
    for (i, nr) in traps.iter().enumerate() {
        let i = i as u8;
        p.push(jump(BPF_JEQ_K, *nr as u32, notif - i - 1, 0));
    }
    p.push(jump(BPF_JEQ_K, SYS_SENDTO as u32, 0, allow - n - 1));
    p.push(stmt(BPF_LD_W_ABS, off_arg_lo(4)));
    p.push(jump(BPF_JEQ_K, 0, 0, notif - (n + 2) - 1));
    p.push(stmt(BPF_LD_W_ABS, off_arg_lo(4) + 4));
    p.push(jump(BPF_JEQ_K, 0, allow - (n + 4) - 1, notif - (n + 4) - 1));
    p.push(stmt(BPF_RET_K, RET_ALLOW));
    p.push(stmt(BPF_RET_K, RET_USER_NOTIF));
    p
}

/// Sets `PR_SET_NO_NEW_PRIVS` (required to install a filter without
/// CAP_SYS_ADMIN, and harmless with it) and installs the filter on the
/// calling thread, returning the listener. Without
/// [`FLAG_WAIT_KILLABLE_RECV`] support (kernel older than 5.19) the filter
/// is installed without it; the second value says whether it was kept.
pub fn install() -> io::Result<(OwnedFd, bool)> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let prog = program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    let mut killable = true;
    let fd = loop {
        let flags = FLAG_NEW_LISTENER | if killable { FLAG_WAIT_KILLABLE_RECV } else { 0 };
        // SAFETY: fprog points to `prog`, which outlives the call; the kernel
        // copies the program before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                flags,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc >= 0 {
            break rc as libc::c_int;
        }
        let e = io::Error::last_os_error();
        if killable && e.raw_os_error() == Some(libc::EINVAL) {
            killable = false;
            continue;
        }
        return Err(e);
    };
    // SAFETY: the kernel just returned this new descriptor to us alone.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, killable))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on a seccomp_data image, as the kernel would.
    fn run(p: &[libc::sock_filter], data: &[u8; 64]) -> u32 {
        let word = |at: u32| {
            let a = at as usize;
            u32::from_le_bytes([data[a], data[a + 1], data[a + 2], data[a + 3]])
        };
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            match i.code {
                BPF_LD_W_ABS => acc = word(i.k),
                BPF_JEQ_K | BPF_JGE_K => {
                    let hit = if i.code == BPF_JEQ_K {
                        acc == i.k
                    } else {
                        acc >= i.k
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                BPF_RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
            pc += 1;
        }
    }

    fn data(nr: i64, a4: u64) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        d[4..8].copy_from_slice(&AUDIT_ARCH.to_le_bytes());
        d[16 + 32..16 + 40].copy_from_slice(&a4.to_le_bytes());
        d
    }

    #[test]
    fn verdicts() {
        let p = program();
        for nr in [SYS_BIND, SYS_CONNECT, SYS_SENDMSG, SYS_SENDMMSG] {
            assert_eq!(run(&p, &data(nr, 0)), RET_USER_NOTIF, "nr {nr}");
        }
        assert_eq!(run(&p, &data(SYS_SENDTO, 0)), RET_ALLOW, "send()");
        assert_eq!(run(&p, &data(SYS_SENDTO, 0x7fff_0000_1000)), RET_USER_NOTIF);
        assert_eq!(run(&p, &data(SYS_SENDTO, 0x1_0000_0000)), RET_USER_NOTIF);
        assert_eq!(run(&p, &data(SYS_SENDTO, 8)), RET_USER_NOTIF);
        for nr in [
            libc::SYS_socket,
            libc::SYS_read,
            libc::SYS_listen,
            libc::SYS_accept4,
        ] {
            assert_eq!(run(&p, &data(nr, 1)), RET_ALLOW, "nr {nr}");
        }
        let mut other = data(SYS_CONNECT, 0);
        other[4..8].copy_from_slice(&0x4000_0003u32.to_le_bytes());
        assert_eq!(run(&p, &other), RET_ERRNO | libc::ENOSYS as u32, "i386");
        #[cfg(target_arch = "x86_64")]
        {
            let x32 = data(SYS_CONNECT | i64::from(X32_SYSCALL_BIT), 0);
            assert_eq!(run(&p, &x32), RET_ERRNO | libc::ENOSYS as u32, "x32");
        }
    }
}
