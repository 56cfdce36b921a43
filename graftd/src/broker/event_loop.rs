//! The broker thread's poll loop: the wake-up pipe from the control thread,
//! every namespace's listener and every connection, served in bursts so no
//! client holds the thread.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft_core::proto::broker::{Op, BATCH_FIRST, BATCH_MAX, REPLY_LEN, REQUEST_LEN};
use graft_core::NetnsId;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::{decode, handle_sized, Batch, Cmd, LogBudget, CHURN_WINDOW, MAX_CONNS_PER_BROKER};
use crate::sys::{self, Next};
use crate::Ctx;

/// Most records served from one connection before looking at the others.
const BURST: usize = 16;
/// How long accepting pauses when graftd is out of descriptors.
const EMFILE_PAUSE: Duration = Duration::from_millis(100);

struct Conn {
    fd: OwnedFd,
    ns: NetnsId,
    /// Last time it sent a request (or was accepted).
    last: Instant,
    /// Size of the next `SocketBatch` reply (see `BATCH_FIRST`).
    batch: usize,
    /// `SocketBatch` replies sent in a row, each within `CHURN_WINDOW` of
    /// the one before.
    batches: u32,
    /// When the last `SocketBatch` reply was sent.
    last_batch: Instant,
}

pub struct Loop {
    ctx: Arc<Ctx>,
    rx: mpsc::Receiver<Cmd>,
    wake: UnixDatagram,
    listeners: HashMap<NetnsId, OwnedFd>,
    conns: Vec<Conn>,
    per_ns: HashMap<NetnsId, usize>,
    accept_paused_until: Option<Instant>,
    log_budget: LogBudget,
}

impl Loop {
    pub fn new(ctx: Arc<Ctx>, rx: mpsc::Receiver<Cmd>, wake: UnixDatagram) -> Self {
        Loop {
            ctx,
            rx,
            wake,
            listeners: HashMap::new(),
            conns: Vec::new(),
            per_ns: HashMap::new(),
            accept_paused_until: None,
            log_budget: LogBudget::default(),
        }
    }

    pub fn run(mut self) {
        let mut buf = [0u8; REQUEST_LEN + 1];
        loop {
            let now = Instant::now();
            let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
            if accepting {
                self.accept_paused_until = None;
            }
            let lids: Vec<NetnsId> = if accepting {
                self.listeners.keys().copied().collect()
            } else {
                vec![]
            };
            let (wake_ev, lev, cev) = {
                let mut pfds = Vec::with_capacity(1 + lids.len() + self.conns.len());
                pfds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
                for id in &lids {
                    if let Some(l) = self.listeners.get(id) {
                        pfds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                    }
                }
                for c in &self.conns {
                    pfds.push(PollFd::new(c.fd.as_fd(), PollFlags::POLLIN));
                }
                let timeout = match self.accept_paused_until {
                    Some(t) => PollTimeout::try_from(t.saturating_duration_since(now))
                        .unwrap_or(PollTimeout::MAX),
                    None => PollTimeout::NONE,
                };
                match nix::poll::poll(&mut pfds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        log::error!("broker poll failed: {e}; broker thread stops");
                        return;
                    }
                }
                let ev: Vec<PollFlags> = pfds
                    .iter()
                    .map(|p| p.revents().unwrap_or(PollFlags::empty()))
                    .collect();
                let wake_ev = ev[0];
                let lev = ev[1..1 + lids.len()].to_vec();
                let cev = ev[1 + lids.len()..].to_vec();
                (wake_ev, lev, cev)
            };

            // Connections first: their indices are only valid until the
            // table changes.
            let mut dead = Vec::new();
            for (i, ev) in cev.iter().enumerate() {
                if ev.is_empty() {
                    continue;
                }
                if !self.serve(i, &mut buf) {
                    dead.push(i);
                }
            }
            for i in dead.into_iter().rev() {
                self.drop_conn(i);
            }
            for (id, ev) in lids.iter().zip(lev) {
                if !ev.is_empty() {
                    self.accept(*id);
                }
            }
            if !wake_ev.is_empty() {
                let mut b = [0u8; 64];
                while self.wake.recv(&mut b).is_ok() {}
                while let Ok(cmd) = self.rx.try_recv() {
                    self.command(cmd);
                }
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open(ns, fd) => {
                log::debug!("broker for {ns} opened");
                self.listeners.insert(ns, fd);
            }
            Cmd::Close(ns, done) => {
                self.listeners.remove(&ns);
                let before = self.conns.len();
                self.conns.retain(|c| c.ns != ns);
                self.per_ns.remove(&ns);
                log::debug!(
                    "broker for {ns} closed ({} connections dropped)",
                    before - self.conns.len()
                );
                let _ = done.send(());
            }
        }
    }

    fn drop_conn(&mut self, i: usize) {
        let c = self.conns.swap_remove(i);
        if let Some(n) = self.per_ns.get_mut(&c.ns) {
            *n = n.saturating_sub(1);
        }
    }

    fn accept(&mut self, ns: NetnsId) {
        for _ in 0..BURST {
            let Some(l) = self.listeners.get(&ns) else {
                return;
            };
            match sys::accept(l.as_fd()) {
                Ok(fd) => {
                    if self.per_ns.get(&ns).copied().unwrap_or(0) >= MAX_CONNS_PER_BROKER {
                        let idle = self
                            .conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.ns == ns)
                            .min_by_key(|(_, c)| c.last)
                            .map(|(i, _)| i);
                        if let Some(i) = idle {
                            log::warn!(
                                "broker for {ns}: {MAX_CONNS_PER_BROKER} connections open, closing the one idle longest"
                            );
                            self.drop_conn(i);
                        }
                    }
                    *self.per_ns.entry(ns).or_insert(0) += 1;
                    self.conns.push(Conn {
                        fd,
                        ns,
                        last: Instant::now(),
                        batch: BATCH_FIRST,
                        batches: 0,
                        last_batch: Instant::now(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    log::warn!("broker: out of descriptors ({e}); pausing accepts");
                    self.accept_paused_until = Some(Instant::now() + EMFILE_PAUSE);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The peer gave up before we accepted it: nothing to do.
                Err(e) => {
                    log::debug!("broker for {ns}: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Serves what connection `i` sent; false when it must be closed.
    fn serve(&mut self, i: usize, buf: &mut [u8; REQUEST_LEN + 1]) -> bool {
        let Loop {
            conns,
            ctx,
            log_budget,
            ..
        } = self;
        let conn = &mut conns[i];
        let (fd, ns) = (&conn.fd, conn.ns);
        conn.last = Instant::now();
        for _ in 0..BURST {
            let rx = match sys::next_record(fd.as_fd(), buf) {
                Next::Record(rx) => rx,
                Next::Idle => return true,
                Next::Gone => return false,
            };
            let len = rx.len.min(buf.len());
            let (reply, socks) = if let Some(r) = decode::unusable(ns, &rx, &buf[..len]) {
                (r, Vec::new())
            } else if decode::guess_op(&buf[..len]) == Op::Attach {
                let r = crate::seccomp::attach(ctx, ns, fd.as_fd(), &buf[..len]);
                (r, Vec::new())
            } else {
                let batch = Batch::after(conn.batches, conn.batch);
                let r = handle_sized(ctx, ns, &buf[..len], log_budget, batch);
                if r.0.op == Op::SocketBatch && r.0.errno == 0 {
                    conn.batch = (conn.batch * 2).min(BATCH_MAX);
                    let now = Instant::now();
                    conn.batches = if now.duration_since(conn.last_batch) > CHURN_WINDOW {
                        1
                    } else {
                        conn.batches.saturating_add(1)
                    };
                    conn.last_batch = now;
                }
                r
            };
            drop(rx);
            let mut out = [0u8; REPLY_LEN];
            reply.encode(&mut out);
            let pass: Vec<_> = socks.iter().map(|s| s.as_fd()).collect();
            if let Err(e) = sys::send_record(fd.as_fd(), &out, &pass) {
                log::debug!("broker for {ns}: cannot reply ({e}); closing the connection");
                return false;
            }
            // graftd's copies of the sockets are closed here; the client owns them.
            drop(pass);
            sys::close_all(socks);
        }
        true
    }
}
