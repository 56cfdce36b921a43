//! Ping-pong latency over one TCP connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::args::Args;
use crate::stats;

pub fn run(a: &Args) -> Result<()> {
    let addr = a.addr("connect")?;
    let size = a.num("size", 64)? as usize;
    let count = a.num("count", 20_000)?;
    let warmup = a.num("warmup", 500)?;
    let limit = a.secs("secs", 5.0)?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    for _ in 0..warmup {
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("warm-up reply")?;
    }
    let mut ns = Vec::with_capacity(count as usize);
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reply")?;
        ns.push(t.elapsed().as_nanos() as u64);
        if start.elapsed() > limit {
            break;
        }
    }
    anyhow::ensure!(back == msg, "echo returned different bytes");
    println!("{}", stats::summary(&mut ns));
    Ok(())
}
