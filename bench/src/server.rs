//! TCP echo server, one thread per connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::args::Args;

pub fn run(a: &Args) -> Result<()> {
    let addr = a.addr("listen")?;
    let once = a.flag("once");
    let size = a.num("size", 64)? as usize;
    let life = a.secs("secs", 7200.0)?;
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    // The harness kills us, but a leaked server must still go away by itself.
    std::thread::spawn(move || {
        std::thread::sleep(life);
        std::process::exit(0);
    });
    eprintln!("graft-bench server: listening on {}", l.local_addr()?);
    for s in l.incoming() {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                eprintln!("graft-bench server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        std::thread::spawn(move || {
            let _ = if once { answer_once(s, size) } else { echo(s) };
        });
    }
    Ok(())
}

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

/// One request, one reply, then the server closes first (like HTTP with
/// `Connection: close`), so TIME_WAIT lands here and not on the client's
/// ephemeral ports.
fn answer_once(mut s: TcpStream, size: usize) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; size];
    s.read_exact(&mut buf)?;
    s.write_all(&buf)?;
    Ok(())
}
