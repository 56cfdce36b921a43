//! Cost loops for the preload library and the broker.
//!
//! `sendcost`: one UDP socket, a first `sendto()` that decides it (under
//! `graft -e …` that is where it gets grafted), then COUNT more `sendto()`
//! calls through the PLT, so LD_PRELOAD intercepts every one. With `--oob`
//! each call carries MSG_OOB, which UDP refuses at once with EOPNOTSUPP: the
//! kernel part shrinks to a bare syscall and the library's share stands out.
//!
//! `sockcost`: COUNT times a new UDP socket, one `sendto()`, `close()`.
//! Under `graft -e …` every first `sendto()` asks the broker for a socket.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};

use crate::args::Args;
use crate::stats;

pub fn run(a: &Args, per_socket: bool) -> Result<()> {
    let dest = a.addr("dest")?;
    let sa = sockaddr_in(dest)?;
    if per_socket {
        let count = a.num("count", 2000)?;
        let limit = a.secs("secs", 10.0)?;
        let mut ns = Vec::with_capacity(count as usize);
        let start = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            let s = udp_socket()?;
            send(&s, &sa, 0).map_err(|e| anyhow!("sendto {dest} on a new socket: {e}"))?;
            drop(s);
            ns.push(t.elapsed().as_nanos() as u64);
            if start.elapsed() > limit {
                break;
            }
        }
        println!("{}", stats::summary(&mut ns));
        return Ok(());
    }
    let count = a.num("count", 1_000_000)?;
    let oob = a.flag("oob");
    let s = udp_socket()?;
    send(&s, &sa, 0).map_err(|e| anyhow!("first sendto {dest}: {e}"))?;
    let flags = if oob { libc::MSG_OOB } else { 0 };
    let start = Instant::now();
    for _ in 0..count {
        match send(&s, &sa, flags) {
            Ok(()) if !oob => {}
            Err(e) if oob && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Ok(()) => bail!("sendto with MSG_OOB succeeded; expected EOPNOTSUPP"),
            Err(e) => bail!("sendto {dest}: {e}"),
        }
    }
    let el = start.elapsed();
    println!(
        "n={count} ns_per_call={:.1}",
        el.as_nanos() as f64 / count as f64
    );
    Ok(())
}

fn udp_socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and belongs to no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(a: SocketAddr) -> Result<libc::sockaddr_in> {
    let IpAddr::V4(ip) = a.ip() else {
        bail!("only IPv4 destinations are supported");
    };
    Ok(libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    })
}

fn send(s: &OwnedFd, sa: &libc::sockaddr_in, flags: i32) -> std::io::Result<()> {
    let buf = [0x42u8; 16];
    // SAFETY: buf and sa are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags,
            (sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
