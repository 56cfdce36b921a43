//! One new TCP connection per request: connect, 64 bytes out, 64 back,
//! wait for the server's close.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::args::Args;
use crate::stats;

pub fn run(a: &Args) -> Result<()> {
    let addr = a.addr("connect")?;
    let size = a.num("size", 64)? as usize;
    let count = a.num("count", 2000)?;
    let limit = a.secs("secs", 5.0)?;
    let msg = vec![0xa5u8; size];
    let mut back = vec![0u8; size];
    let mut ns = Vec::with_capacity(count as usize);
    let start = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connect {addr} (request {i})"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reply")?;
        let mut rest = [0u8; 1];
        let n = s
            .read(&mut rest)
            .context("waiting for the server's close")?;
        anyhow::ensure!(n == 0, "server sent more than one reply");
        drop(s);
        ns.push(t.elapsed().as_nanos() as u64);
        if start.elapsed() > limit {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(back == msg, "echo returned different bytes");
    let n = ns.len();
    println!(
        "conn_per_s={:.1} {}",
        n as f64 / secs,
        stats::summary(&mut ns)
    );
    Ok(())
}
