//! The seccomp filter the launcher installs before it execs the program.
//!
//! Only the calls that can carry an address graft cares about reach the
//! supervisor: `bind`, `listen`, `connect`, `sendmsg`, `sendmmsg`, and
//! `sendto` when
//! its address argument is not NULL (a plain `send` on a connected socket
//! costs nothing). Everything else is allowed in the kernel. Calls made
//! through another ABI (i386 `int 0x80`, x32) could reach the same socket
//! code unseen, so they fail with `ENOSYS`: fail closed.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use graft_core::call::Call;

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
const BPF_AND_K: u16 = 0x54;

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
const OFF_IP: u32 = 8;
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

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

/// Where jumps go: the verdicts and the optional instruction-pointer check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    Allow,
    Notif,
}

/// The filter program. With `allow_page`, a trapped call made from that
/// page (the preload library's own system-call trampoline, see
/// `libgraft-convert`) is allowed in the kernel: the library already
/// decided it, and must not pay a round trip to graftd.
pub fn program(allow_page: Option<u64>) -> Vec<libc::sock_filter> {
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
    // The rest, with symbolic jump targets resolved below.
    let mut tail: Vec<(libc::sock_filter, Label, Label)> = Vec::new();
    let mut j = |code, k, jt, jf| tail.push((jump(code, k, 0, 0), jt, jf));
    for c in Call::ALL.into_iter().filter(|&c| c != Call::Sendto) {
        j(BPF_JEQ_K, c.nr() as u32, Label::Notif, Label::Next);
    }
    j(
        BPF_JEQ_K,
        Call::Sendto.nr() as u32,
        Label::Next,
        Label::Allow,
    );
    tail.push((stmt(BPF_LD_W_ABS, off_arg_lo(4)), Label::Next, Label::Next));
    let mut j = |code, k, jt, jf| tail.push((jump(code, k, 0, 0), jt, jf));
    j(BPF_JEQ_K, 0, Label::Next, Label::Notif);
    tail.push((
        stmt(BPF_LD_W_ABS, off_arg_lo(4) + 4),
        Label::Next,
        Label::Next,
    ));
    tail.push((jump(BPF_JEQ_K, 0, 0, 0), Label::Allow, Label::Notif));
    // The page check (when asked for) comes first so that every jump goes
    // forward, as BPF requires; then the two verdicts.
    let notif_at = tail.len();
    if let Some(page) = allow_page {
        let page = page & !0xfff;
        tail.push((stmt(BPF_LD_W_ABS, OFF_IP + 4), Label::Next, Label::Next));
        tail.push((
            jump(BPF_JEQ_K, (page >> 32) as u32, 0, 0),
            Label::Next,
            Label::Notif,
        ));
        tail.push((stmt(BPF_LD_W_ABS, OFF_IP), Label::Next, Label::Next));
        tail.push((stmt(BPF_AND_K, 0xffff_f000), Label::Next, Label::Next));
        tail.push((
            jump(BPF_JEQ_K, page as u32, 0, 0),
            Label::Allow,
            Label::Notif,
        ));
    }
    let allow_at = tail.len();
    tail.push((stmt(BPF_RET_K, RET_ALLOW), Label::Next, Label::Next));
    let ret_notif_at = tail.len();
    tail.push((stmt(BPF_RET_K, RET_USER_NOTIF), Label::Next, Label::Next));
    for (i, (mut ins, jt, jf)) in tail.iter().copied().enumerate() {
        if matches!(ins.code, BPF_JEQ_K | BPF_JGE_K) {
            let target = |l: Label| -> u8 {
                let to = match l {
                    Label::Next => i + 1,
                    Label::Allow => allow_at,
                    Label::Notif if i >= notif_at => ret_notif_at,
                    Label::Notif if allow_page.is_some() => notif_at,
                    Label::Notif => ret_notif_at,
                };
                // Short programs: every offset fits (checked by the tests).
                (to - i - 1) as u8
            };
            ins.jt = target(jt);
            ins.jf = target(jf);
        }
        p.push(ins);
    }
    p
}

/// Installs the filter on the calling thread and returns its listener.
/// `PR_SET_NO_NEW_PRIVS` is set only when the kernel requires it (without
/// CAP_SYS_ADMIN), so a root launcher keeps set-id programs working.
/// Without [`FLAG_WAIT_KILLABLE_RECV`] support (kernel older than 5.19) the
/// filter is installed without it; the second value says whether it was
/// kept.
pub fn install(allow_page: Option<u64>) -> io::Result<(OwnedFd, bool)> {
    install_program(&program(allow_page))
}

/// Installs a filter that lets every call through, with a listener that
/// never hears of one: a probe of the listener's own behaviour (see
/// [`crate::notify::recv_ends_when_orphaned`]). Calling thread only.
pub fn install_silent() -> io::Result<OwnedFd> {
    install_program(&[stmt(BPF_RET_K, RET_ALLOW)]).map(|(fd, _)| fd)
}

fn install_program(prog: &[libc::sock_filter]) -> io::Result<(OwnedFd, bool)> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    let mut killable = true;
    let mut nnp = false;
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
        match e.raw_os_error() {
            Some(libc::EINVAL) if killable => killable = false,
            Some(libc::EACCES) if !nnp => {
                // SAFETY: prctl with integer arguments only.
                if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                nnp = true;
            }
            _ => return Err(e),
        }
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
                BPF_AND_K => acc &= i.k,
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
        data_at(nr, a4, 0x7f12_3456_7000)
    }

    fn data_at(nr: i64, a4: u64, ip: u64) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[8..16].copy_from_slice(&ip.to_le_bytes());
        d[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        d[4..8].copy_from_slice(&AUDIT_ARCH.to_le_bytes());
        d[16 + 32..16 + 40].copy_from_slice(&a4.to_le_bytes());
        d
    }

    #[test]
    fn calls_from_the_allowed_page_pass() {
        let page = 0x4772_6166_0000u64;
        let p = program(Some(page));
        for ip in [page, page + 0x22, page + 0xfff] {
            assert_eq!(
                run(&p, &data_at(Call::Connect.nr(), 0, ip)),
                RET_ALLOW,
                "{ip:#x}"
            );
            assert_eq!(run(&p, &data_at(Call::Sendto.nr(), 8, ip)), RET_ALLOW);
        }
        for ip in [page - 1, page + 0x1000, page + (1 << 32), 0x7f00_0000_0000] {
            assert_eq!(
                run(&p, &data_at(Call::Connect.nr(), 0, ip)),
                RET_USER_NOTIF,
                "{ip:#x}"
            );
            assert_eq!(run(&p, &data_at(Call::Sendto.nr(), 8, ip)), RET_USER_NOTIF);
        }
        assert_eq!(run(&p, &data_at(Call::Sendto.nr(), 0, 1)), RET_ALLOW);
        assert_eq!(run(&p, &data_at(libc::SYS_read, 0, 1)), RET_ALLOW);
    }

    #[test]
    fn verdicts() {
        let p = program(None);
        for c in Call::ALL.into_iter().filter(|&c| c != Call::Sendto) {
            assert_eq!(run(&p, &data(c.nr(), 0)), RET_USER_NOTIF, "{}", c.name());
        }
        assert_eq!(run(&p, &data(Call::Sendto.nr(), 0)), RET_ALLOW, "send()");
        assert_eq!(
            run(&p, &data(Call::Sendto.nr(), 0x7fff_0000_1000)),
            RET_USER_NOTIF
        );
        assert_eq!(
            run(&p, &data(Call::Sendto.nr(), 0x1_0000_0000)),
            RET_USER_NOTIF
        );
        assert_eq!(run(&p, &data(Call::Sendto.nr(), 8)), RET_USER_NOTIF);
        for nr in [libc::SYS_socket, libc::SYS_read, libc::SYS_accept4] {
            assert_eq!(run(&p, &data(nr, 1)), RET_ALLOW, "nr {nr}");
        }
        let mut other = data(Call::Connect.nr(), 0);
        other[4..8].copy_from_slice(&0x4000_0003u32.to_le_bytes());
        assert_eq!(run(&p, &other), RET_ERRNO | libc::ENOSYS as u32, "i386");
        #[cfg(target_arch = "x86_64")]
        {
            let x32 = data(Call::Connect.nr() | i64::from(X32_SYSCALL_BIT), 0);
            assert_eq!(run(&p, &x32), RET_ERRNO | libc::ENOSYS as u32, "x32");
        }
    }
}
