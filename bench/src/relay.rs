//! A docker-proxy-like userland relay. Like docker-proxy, every accepted
//! connection is handled by its own thread, which connects upstream itself
//! (connecting inside the accept loop would serialise all clients and make
//! the proxy look worse than Docker's), then moves bytes in both directions
//! with splice(2) through a pipe, never copying them to user space.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::args::Args;

pub fn run(a: &Args) -> Result<()> {
    let listen = a.addr("listen")?;
    let upstream = a.addr("upstream")?;
    let life = a.secs("secs", 7200.0)?;
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    std::thread::spawn(move || {
        std::thread::sleep(life);
        std::process::exit(0);
    });
    eprintln!("graft-bench relay: {listen} -> {upstream}");
    for c in l.incoming() {
        match c {
            Ok(c) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(c, upstream) {
                        eprintln!("graft-bench relay: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("graft-bench relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

fn serve(client: TcpStream, upstream: SocketAddr) -> Result<()> {
    let up = TcpStream::connect_timeout(&upstream, Duration::from_secs(3))
        .with_context(|| format!("connect upstream {upstream}"))?;
    client.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let (c2, u2) = (client.try_clone()?, up.try_clone()?);
    let back = std::thread::spawn(move || pump(&u2, &c2));
    let fwd = pump(&client, &up);
    let bwd = back
        .join()
        .map_err(|_| anyhow::anyhow!("relay thread panicked"))?;
    fwd.context("client -> upstream")?;
    bwd.context("upstream -> client")?;
    Ok(())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn splice(from: i32, to: i32, len: usize) -> std::io::Result<usize> {
    loop {
        // SAFETY: plain fds and null offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Moves bytes from `from` to `to` until EOF, then half-closes `to`. On an
/// error both sockets are shut down so the other direction's thread ends too.
fn pump(from: &TcpStream, to: &TcpStream) -> std::io::Result<()> {
    let res = (|| {
        let (r, w) = pipe()?;
        loop {
            let n = splice(from.as_raw_fd(), w.as_raw_fd(), 1 << 16)?;
            if n == 0 {
                return Ok(());
            }
            let mut left = n;
            while left > 0 {
                let m = splice(r.as_raw_fd(), to.as_raw_fd(), left)?;
                if m == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
                }
                left -= m;
            }
        }
    })();
    match res {
        Ok(()) => {
            let _ = to.shutdown(Shutdown::Write);
            Ok(())
        }
        Err(e) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            Err(e)
        }
    }
}
