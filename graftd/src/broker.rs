//! The brokers: one abstract `SOCK_SEQPACKET` listener per namespace with
//! endpoints, all served by one thread that stays in graftd's own namespace.
//!
//! Each listener was created inside its namespace (see
//! [`crate::netns::make_broker`]), so only processes of that namespace can
//! connect to it; every connection remembers which listener it came from and
//! is served from that namespace's table only. Everything is non-blocking: a
//! client that sends slowly or never reads its replies costs the others
//! nothing (a reply that cannot be sent at once closes the connection). A
//! namespace whose broker has [`MAX_CONNS_PER_BROKER`] connections open
//! closes the one idle longest for each new one, so a process holding
//! connections open can neither starve its own namespace's newcomers nor,
//! being bounded per namespace, anyone else's.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use graft_core::proto::broker::{
    Op, OptValue, Purpose, Reason, Reply, Request, BATCH_FIRST, BATCH_MAX, REPLY_LEN, REQUEST_LEN,
};
use graft_core::sockopt::{self, Class, Kind};
use graft_core::{EndpointAddr, NetnsId};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::factory::{self, BindAddr, SocketParams};
use crate::state::{Endpoint, Target};
use crate::sys;
use crate::Ctx;

/// Most connections one namespace's broker keeps open.
pub const MAX_CONNS_PER_BROKER: usize = 1024;
/// Most records served from one connection before looking at the others.
const BURST: usize = 16;
/// Longest the control thread waits for a broker to be closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long accepting pauses when graftd is out of descriptors.
const EMFILE_PAUSE: Duration = Duration::from_millis(100);

/// Instructions from the control thread.
pub enum Cmd {
    /// Start serving a namespace's listener.
    Open(NetnsId, OwnedFd),
    /// Stop serving a namespace: close its listener and connections, then
    /// acknowledge (the abstract name is free again once acknowledged).
    Close(NetnsId, mpsc::SyncSender<()>),
}

/// The control thread's handle on the broker thread.
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    wake: UnixDatagram,
}

impl Handle {
    /// Hands a namespace's new listener to the broker thread.
    pub fn open(&self, ns: NetnsId, listener: OwnedFd) {
        self.send(Cmd::Open(ns, listener));
    }

    /// Closes a namespace's broker and waits until it is closed, so a new
    /// endpoint added right after can bind the same abstract name again.
    /// Must not be called with the state lock held (the broker thread may be
    /// waiting for it).
    pub fn close(&self, ns: NetnsId) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Cmd::Close(ns, tx));
        if rx.recv_timeout(CLOSE_TIMEOUT).is_err() {
            log::warn!("broker thread did not confirm closing the broker of {ns}");
        }
    }

    fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_err() {
            log::error!("broker thread is gone");
            return;
        }
        // A full wake buffer means a wake-up is already pending.
        let _ = self.wake.send(&[1]);
    }
}

/// Starts the broker thread.
pub fn spawn(ctx: Arc<Ctx>) -> io::Result<Handle> {
    let (tx, rx) = mpsc::channel();
    let (wake, wake_rx) = UnixDatagram::pair()?;
    wake.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Loop::new(ctx, rx, wake_rx).run()
            }));
            // Without its broker thread graftd would accept endpoints it can
            // no longer serve: fail loudly instead.
            let why = if served.is_err() {
                "panicked"
            } else {
                "stopped"
            };
            log::error!("broker thread {why}; graftd exits");
            std::process::exit(70);
        })?;
    Ok(Handle { tx, wake })
}

struct Conn {
    fd: OwnedFd,
    ns: NetnsId,
    /// Last time it sent a request (or was accepted).
    last: Instant,
    /// Size of the next `SocketBatch` reply (see `BATCH_FIRST`).
    batch: usize,
}

struct Loop {
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
    fn new(ctx: Arc<Ctx>, rx: mpsc::Receiver<Cmd>, wake: UnixDatagram) -> Self {
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

    fn run(mut self) {
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
            let rx = match sys::recv_record(fd.as_fd(), buf) {
                Ok(Some(rx)) => rx,
                Ok(None) => return false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            let len = rx.len.min(buf.len());
            let (reply, socks) = if rx.truncated || !rx.fds.is_empty() || rx.ctrunc {
                log::debug!(
                    "broker for {ns}: malformed record ({} bytes, {} descriptors attached)",
                    rx.len,
                    rx.fds.len()
                );
                (
                    Reply::err(guess_op(&buf[..len]), libc::EINVAL, Reason::Malformed),
                    Vec::new(),
                )
            } else if guess_op(&buf[..len]) == Op::Attach {
                let r = crate::seccomp::attach(ctx, ns, fd.as_fd(), &buf[..len]);
                (r, Vec::new())
            } else {
                let r = handle_sized(ctx, ns, &buf[..len], log_budget, conn.batch);
                if r.0.op == Op::SocketBatch && r.0.errno == 0 {
                    conn.batch = (conn.batch * 2).min(BATCH_MAX);
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
            drop(socks);
        }
        true
    }
}

/// Refusals are worth an info line each, but a client must not be able to
/// flood the log: past a few per second they drop to debug level, and the
/// next info line says how many were demoted.
#[derive(Debug)]
pub struct LogBudget {
    window: Instant,
    used: u32,
    demoted: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget {
            window: Instant::now(),
            used: 0,
            demoted: 0,
        }
    }
}

impl LogBudget {
    const PER_SECOND: u32 = 20;

    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.demoted > 0 {
                log::info!(
                    "{} more refusals in the last period were logged at debug level",
                    self.demoted
                );
            }
            *self = LogBudget::default();
        }
        if self.used < Self::PER_SECOND {
            self.used += 1;
            true
        } else {
            self.demoted += 1;
            false
        }
    }
}

/// The op of a record that failed to decode, for the reply header.
fn guess_op(b: &[u8]) -> Op {
    match b.get(6..8).map(|o| u16::from_le_bytes([o[0], o[1]])) {
        Some(2) => Op::Lookup,
        Some(3) => Op::SocketBatch,
        Some(4) => Op::SocketDual,
        Some(5) => Op::Rules,
        Some(6) => Op::Attach,
        _ => Op::Socket,
    }
}

/// A refused request: errno, reason and (for option refusals) the option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: libc::c_int,
    pub reason: Reason,
    pub opt: Option<(libc::c_int, libc::c_int)>,
}

impl Refusal {
    fn new(errno: libc::c_int, reason: Reason) -> Self {
        Refusal {
            errno,
            reason,
            opt: None,
        }
    }
    fn opt(errno: libc::c_int, reason: Reason, o: &OptValue) -> Self {
        Refusal {
            errno,
            reason,
            opt: Some((o.level, o.name)),
        }
    }
    fn reply(&self, op: Op) -> Reply {
        let mut r = Reply::err(op, self.errno, self.reason);
        if let Some((l, n)) = self.opt {
            r.opt_level = l;
            r.opt_name = n;
        }
        r
    }
}

/// Answers one record from a client of namespace `ns`'s broker, as the
/// first request of a connection.
#[cfg(test)]
pub fn handle(
    ctx: &Ctx,
    ns: NetnsId,
    rec: &[u8],
    log_budget: &mut LogBudget,
) -> (Reply, Vec<OwnedFd>) {
    handle_sized(ctx, ns, rec, log_budget, BATCH_FIRST)
}

/// Answers one record; a `SocketBatch` gets up to `batch` sockets.
pub fn handle_sized(
    ctx: &Ctx,
    ns: NetnsId,
    rec: &[u8],
    log_budget: &mut LogBudget,
    batch: usize,
) -> (Reply, Vec<OwnedFd>) {
    let req = match Request::decode(rec) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("broker for {ns}: malformed request: {e}");
            return (
                Reply::err(guess_op(rec), libc::EINVAL, Reason::Malformed),
                Vec::new(),
            );
        }
    };
    if req.op == Op::Rules {
        let rules = ctx.state().rules(ns);
        return match crate::rules_fd::sealed(&rules.to_blob()) {
            Ok(fd) => (Reply::ok(Op::Rules, &[]), vec![fd]),
            Err(e) => {
                log::warn!("broker for {ns}: cannot hand out the rules: {e}");
                (
                    Reply::err(
                        Op::Rules,
                        e.raw_os_error().unwrap_or(libc::EIO),
                        Reason::SocketFailed,
                    ),
                    Vec::new(),
                )
            }
        };
    }
    let ep = ctx.state().lookup(ns, &req.endpoint);
    let Some(ep) = ep else {
        let errno = match req.op {
            Op::Lookup => libc::ENOENT,
            Op::Socket | Op::SocketBatch | Op::SocketDual | Op::Rules | Op::Attach => {
                libc::EADDRNOTAVAIL
            }
        };
        log::debug!("broker for {ns}: no endpoint {}", req.endpoint);
        return (Reply::err(req.op, errno, Reason::NoEndpoint), Vec::new());
    };
    match req.op {
        // Request::decode never yields it: attach records are served by
        // crate::seccomp, which needs the connection.
        Op::Attach => (
            Reply::err(Op::Attach, libc::EINVAL, Reason::Malformed),
            Vec::new(),
        ),
        Op::SocketDual => dual(ctx, ns, &ep, &req, log_budget),
        Op::Lookup => (
            Reply::ok(Op::Lookup, &configured_sockaddr(&ep.spec.addr)),
            Vec::new(),
        ),
        Op::Socket | Op::SocketBatch | Op::Rules => {
            // An egress socket of a unix endpoint is handed out connected:
            // a batch would open connections nobody uses yet.
            let unix = matches!(ep.spec.addr, EndpointAddr::Unix { .. });
            let want = if req.op == Op::SocketBatch && !unix {
                batch.clamp(1, BATCH_MAX)
            } else {
                1
            };
            let mut made: Vec<factory::Made> = Vec::with_capacity(want);
            let mut failed = None;
            for _ in 0..want {
                match socket_for(ctx, &ep, &req, made.is_empty()) {
                    Ok(m) => {
                        ep.count(true);
                        made.push(m);
                    }
                    Err(r) => {
                        failed = Some(r);
                        break;
                    }
                }
            }
            if let Some(first) = made.first() {
                if req.op == Op::SocketBatch {
                    // Tests count these lines to tell batches from single requests.
                    log::debug!(
                        "{ns} endpoint {}: handed out {} {} sockets (SocketBatch){}",
                        ep.spec.name,
                        made.len(),
                        describe(&req),
                        failed
                            .map(|r| format!(", then: {}", io::Error::from_raw_os_error(r.errno)))
                            .unwrap_or_default()
                    );
                } else {
                    log::debug!(
                        "{ns} endpoint {}: handed out a {} socket",
                        ep.spec.name,
                        describe(&req)
                    );
                }
                let reply = Reply::ok(req.op, &first.addr);
                return (reply, made.into_iter().map(|m| m.fd).collect());
            }
            // Nothing made: the first attempt's refusal, as for one socket.
            let Some(r) = failed else {
                return (
                    Reply::err(req.op, libc::EIO, Reason::SocketFailed),
                    Vec::new(),
                );
            };
            ep.count(false);
            let opt = r
                .opt
                .map(|(l, n)| format!(" (option level {l} name {n}{})", label(l, n)))
                .unwrap_or_default();
            let level = if log_budget.take() {
                log::Level::Info
            } else {
                log::Level::Debug
            };
            log::log!(
                level,
                "{ns} endpoint {}: refused a {} socket: {}{opt}: {}",
                ep.spec.name,
                describe(&req),
                r.reason.describe(),
                io::Error::from_raw_os_error(r.errno)
            );
            (r.reply(req.op), Vec::new())
        }
    }
}

/// A `SocketDual` request: one AF_INET6 listener bound to the IPv4
/// endpoint `ep4` (as `[::ffff:A4]:P4`, taking IPv4 connections natively)
/// that graft-ebpf's sk_lookup program also hands the IPv6 connections to
/// the second endpoint. sk_lookup works inside one namespace, the one it is
/// attached to (graftd's own), so both endpoints must target it. It has to
/// be listening to go into the steering map: graftd listens (the
/// application's own listen() then only sets its backlog).
fn dual(
    ctx: &Ctx,
    ns: NetnsId,
    ep4: &Endpoint,
    req: &Request,
    log_budget: &mut LogBudget,
) -> (Reply, Vec<OwnedFd>) {
    let refuse = |errno: libc::c_int, reason: Reason, why: String, lb: &mut LogBudget| {
        let level = if lb.take() {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "{ns} endpoint {}: refused a dual-stack listener: {why}",
            ep4.spec.name
        );
        (Reply::err(Op::SocketDual, errno, reason), Vec::new())
    };
    let Some(name6) = req.dual() else {
        return refuse(
            libc::EINVAL,
            Reason::Malformed,
            "no IPv6 endpoint".into(),
            log_budget,
        );
    };
    let Some(ep6) = ctx.state().lookup(ns, &name6) else {
        return refuse(
            libc::EADDRNOTAVAIL,
            Reason::NoEndpoint,
            format!("no endpoint {name6}"),
            log_budget,
        );
    };
    let nodual =
        |why: String, lb: &mut LogBudget| refuse(libc::EOPNOTSUPP, Reason::NoDualStack, why, lb);
    let (EndpointAddr::Ipv4 { .. }, EndpointAddr::Ipv6 { addr: a6, port: p6 }) =
        (&ep4.spec.addr, &ep6.spec.addr)
    else {
        return nodual(
            format!(
                "{} is not type ipv4 or {name6} is not type ipv6",
                ep4.spec.name
            ),
            log_budget,
        );
    };
    if !matches!(ep4.target, Target::Own) || !matches!(ep6.target, Target::Own) {
        return nodual(
            "both endpoints must target graftd's own namespace (sk_lookup cannot cross namespaces)"
                .into(),
            log_budget,
        );
    }
    if req.family != libc::AF_INET6 || req.sotype != libc::SOCK_STREAM {
        return refuse(
            libc::EINVAL,
            Reason::Malformed,
            "not an AF_INET6 stream socket".into(),
            log_budget,
        );
    }
    let made = match socket_for(ctx, ep4, req, true) {
        Ok(m) => m,
        Err(r) => {
            ep4.count(false);
            return refuse(
                r.errno,
                r.reason,
                format!(
                    "{}: {}",
                    r.reason.describe(),
                    io::Error::from_raw_os_error(r.errno)
                ),
                log_budget,
            );
        }
    };
    if let Err(e) = nix::sys::socket::listen(&made.fd, nix::sys::socket::Backlog::MAXCONN) {
        return refuse(
            e as libc::c_int,
            Reason::SocketFailed,
            format!("listen(): {e}"),
            log_budget,
        );
    }
    let port = p6.unwrap_or_else(|| u16::from_be_bytes([made.addr[2], made.addr[3]]));
    if let Err(e) = ctx
        .hooks
        .steer_v6(made.fd.as_fd(), *a6, port, libc::IPPROTO_TCP)
    {
        return nodual(
            format!(
                "IPv6 steering to [{a6}]:{port} unavailable ({e}; needs graftd's eBPF companion)"
            ),
            log_budget,
        );
    }
    ep4.count(true);
    log::debug!(
        "{ns} endpoint {}: handed out a dual-stack listener, also answering [{a6}]:{port} for {name6}",
        ep4.spec.name
    );
    (Reply::ok(Op::SocketDual, &made.addr), vec![made.fd])
}

fn label(level: libc::c_int, name: libc::c_int) -> String {
    sockopt::lookup(level, name)
        .map(|o| format!(", {}", o.label))
        .unwrap_or_default()
}

fn describe(req: &Request) -> String {
    let fam = match req.family {
        libc::AF_INET => "AF_INET",
        libc::AF_INET6 => "AF_INET6",
        libc::AF_UNIX => "AF_UNIX",
        _ => "other-family",
    };
    let ty = match req.sotype {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "other-type",
    };
    format!("{fam} {ty}")
}

fn socket_for(
    ctx: &Ctx,
    ep: &Endpoint,
    req: &Request,
    want_addr: bool,
) -> Result<factory::Made, Refusal> {
    let mut params = plan(&ep.spec.addr, req)?;
    params.want_addr = want_addr;
    params.port_at_connect = port_at_connect(&params, req.purpose, ctx.hooks.bind_guarded());
    let made = match &ep.target {
        Target::Own => factory::make_here(&params),
        Target::Foreign(w) => w.make(params),
    }
    .map_err(|e| {
        log::debug!("endpoint {}: {e}", ep.spec.name);
        Refusal {
            errno: e.errno(),
            reason: Reason::SocketFailed,
            opt: e.option(),
        }
    })?;
    ctx.hooks
        .socket_handed_out(made.fd.as_fd(), &ep.hook_ref(), req.purpose)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOBUFS) => Refusal::new(libc::ENOBUFS, Reason::Limit),
            errno => Refusal::new(errno.unwrap_or(libc::EPERM), Reason::Policy),
        })?;
    Ok(made)
}

/// Whether a socket's port is left to `connect()`, as on the host: then
/// TIME_WAIT ports are reused (tcp_tw_reuse) and one port serves many
/// 4-tuples, where a port taken at bind time is unusable until its TIME_WAIT
/// ends, so a client churning connections ran out of ports under graft only.
/// TCP egress sockets of a `dynamic` endpoint, and only while the bind guard
/// is loaded (the holder could re-bind a socket without a port anywhere).
/// Without it (`--no-ebpf`) the port is taken at bind, as before.
pub fn port_at_connect(p: &SocketParams, purpose: Purpose, guarded: bool) -> bool {
    let dynamic = match &p.bind {
        BindAddr::V4(a) => a.port() == 0,
        BindAddr::V6(a) => a.port() == 0,
        BindAddr::Unix(_) | BindAddr::UnixConnect(_) => false,
    };
    guarded && purpose == Purpose::Egress && p.sotype == libc::SOCK_STREAM && dynamic
}

/// The address an endpoint is configured with, as a raw sockaddr (port 0 for
/// `dynamic`).
pub fn configured_sockaddr(addr: &EndpointAddr) -> Vec<u8> {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6, UnixAddr};
    match addr {
        EndpointAddr::Ipv4 { addr, port } => sys::sockaddr_bytes(&SockaddrIn::from(
            SocketAddrV4::new(*addr, port.unwrap_or(0)),
        )),
        EndpointAddr::Ipv6 { addr, port } => sys::sockaddr_bytes(&SockaddrIn6::from(
            SocketAddrV6::new(*addr, port.unwrap_or(0), 0, 0),
        )),
        EndpointAddr::Unix { path } => UnixAddr::new(path.as_path())
            .map(|a| sys::sockaddr_bytes(&a))
            .unwrap_or_default(),
    }
}

/// Decides, without touching the system, how to make the socket a request
/// asks for: checks family, type, protocol and every option against the
/// endpoint, and picks the address to bind.
pub fn plan(addr: &EndpointAddr, req: &Request) -> Result<SocketParams, Refusal> {
    const TYPE_MASK: libc::c_int = 0xf;
    if req.sotype & !TYPE_MASK != 0 {
        return Err(Refusal::new(libc::EINVAL, Reason::Malformed));
    }
    let mismatch = || Refusal::new(libc::EAFNOSUPPORT, Reason::FamilyMismatch);
    if let (EndpointAddr::Unix { path }, libc::AF_INET | libc::AF_INET6) = (addr, req.family) {
        return plan_inet_on_unix(path, req);
    }
    let mapped = matches!(addr, EndpointAddr::Ipv4 { .. }) && req.family == libc::AF_INET6;
    let bind = match (addr, req.family) {
        (EndpointAddr::Ipv4 { addr, port }, libc::AF_INET) => {
            BindAddr::V4(SocketAddrV4::new(*addr, port.unwrap_or(0)))
        }
        (EndpointAddr::Ipv4 { addr, port }, libc::AF_INET6) => BindAddr::V6(SocketAddrV6::new(
            addr.to_ipv6_mapped(),
            port.unwrap_or(0),
            0,
            0,
        )),
        (EndpointAddr::Ipv6 { addr, port }, libc::AF_INET6) => {
            BindAddr::V6(SocketAddrV6::new(*addr, port.unwrap_or(0), 0, 0))
        }
        (EndpointAddr::Unix { path }, libc::AF_UNIX) => BindAddr::Unix(path.clone()),
        _ => return Err(mismatch()),
    };
    let unix = req.family == libc::AF_UNIX;
    let proto_ok = match req.sotype {
        libc::SOCK_STREAM => req.protocol == 0 || (!unix && req.protocol == libc::IPPROTO_TCP),
        libc::SOCK_DGRAM => req.protocol == 0 || (!unix && req.protocol == libc::IPPROTO_UDP),
        libc::SOCK_SEQPACKET if unix => req.protocol == 0,
        _ => return Err(Refusal::new(libc::ESOCKTNOSUPPORT, Reason::FamilyMismatch)),
    };
    if !proto_ok {
        return Err(Refusal::new(libc::EPROTONOSUPPORT, Reason::FamilyMismatch));
    }
    let mut opts = Vec::with_capacity(req.nopts);
    for o in req.options() {
        let Some(known) = sockopt::lookup(o.level, o.name) else {
            return Err(Refusal::opt(libc::EPERM, Reason::OptionRefused, o));
        };
        if known.class == Class::Refuse {
            return Err(Refusal::opt(libc::EPERM, Reason::OptionRefused, o));
        }
        let len = o.len as usize;
        let size_ok = match known.kind {
            Kind::Name16 => (1..=Kind::Name16.size()).contains(&len),
            k => len == k.size(),
        };
        if !size_ok {
            return Err(Refusal::opt(libc::EINVAL, Reason::Malformed, o));
        }
        if (o.level, o.name) == (libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT) {
            // Binding without a port leaves the socket re-bindable unless the
            // bind guard is loaded: graftd decides (port_at_connect), never
            // the request.
            continue;
        }
        if mapped
            && (o.level, o.name) == (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
            && o.as_int() != Some(0)
        {
            return Err(Refusal::opt(libc::EAFNOSUPPORT, Reason::FamilyMismatch, o));
        }
        opts.push(*o);
    }
    Ok(SocketParams {
        family: req.family,
        sotype: req.sotype,
        protocol: req.protocol,
        opts,
        bind,
        port_at_connect: false,
        want_addr: true,
    })
}

/// Socket-level options that mean the same on a unix stream socket; every
/// other option an INET program sets (TCP_NODELAY, keepalive timers, TOS
/// ...) has no meaning there and is dropped.
const UNIX_KEEPS: [libc::c_int; 8] = [
    libc::SO_REUSEADDR,
    libc::SO_KEEPALIVE,
    libc::SO_LINGER,
    libc::SO_RCVBUF,
    libc::SO_SNDBUF,
    libc::SO_RCVLOWAT,
    libc::SO_RCVTIMEO,
    libc::SO_SNDTIMEO,
];

/// An AF_INET/AF_INET6 stream socket grafted onto a `type unix` endpoint:
/// graftd makes a unix stream socket, bound at the path for ingress (a
/// listener) or connected to it for egress (the path lives in graftd's
/// mount namespace, not the container's). Datagram sockets are refused:
/// a unix datagram socket would not answer the INET addresses the program
/// sends to and receives from.
fn plan_inet_on_unix(path: &std::path::Path, req: &Request) -> Result<SocketParams, Refusal> {
    use graft_core::proto::broker::Purpose;
    match (req.sotype, req.protocol) {
        (libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => {}
        (libc::SOCK_DGRAM, _) => {
            return Err(Refusal::new(libc::ESOCKTNOSUPPORT, Reason::FamilyMismatch))
        }
        _ => return Err(Refusal::new(libc::EPROTONOSUPPORT, Reason::FamilyMismatch)),
    }
    let mut opts = Vec::new();
    for o in req.options() {
        match sockopt::lookup(o.level, o.name) {
            Some(k) if k.class != Class::Refuse => {}
            _ => return Err(Refusal::opt(libc::EPERM, Reason::OptionRefused, o)),
        }
        if o.level == libc::SOL_SOCKET && UNIX_KEEPS.contains(&o.name) {
            opts.push(*o);
        }
    }
    let bind = match req.purpose {
        Purpose::Ingress => BindAddr::Unix(path.to_path_buf()),
        Purpose::Egress => BindAddr::UnixConnect(path.to_path_buf()),
    };
    Ok(SocketParams {
        family: libc::AF_UNIX,
        sotype: libc::SOCK_STREAM,
        protocol: 0,
        opts,
        bind,
        port_at_connect: false,
        want_addr: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::proto::broker::Purpose;
    use graft_core::EndpointName;

    fn v4() -> EndpointAddr {
        EndpointAddr::Ipv4 {
            addr: "127.0.0.1".parse().unwrap(),
            port: Some(8080),
        }
    }

    fn req(family: libc::c_int, sotype: libc::c_int, protocol: libc::c_int) -> Request {
        Request::new(
            Op::Socket,
            EndpointName::new("ep").unwrap(),
            family,
            sotype,
            protocol,
            Purpose::Ingress,
        )
    }

    fn int(v: i32) -> [u8; 4] {
        v.to_le_bytes()
    }

    #[test]
    fn escaping_options_are_refused() {
        for (l, n, v) in [
            (libc::SOL_SOCKET, libc::SO_BINDTODEVICE, b"lo\0".to_vec()),
            (libc::SOL_SOCKET, libc::SO_MARK, int(1).to_vec()),
            (libc::IPPROTO_IP, libc::IP_TRANSPARENT, int(1).to_vec()),
            (libc::IPPROTO_IP, libc::IP_FREEBIND, int(1).to_vec()),
            (libc::SOL_SOCKET, 9999, int(1).to_vec()),
        ] {
            let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(r.push_opt(l, n, &v));
            let e = plan(&v4(), &r).unwrap_err();
            assert_eq!(
                (e.errno, e.reason, e.opt),
                (libc::EPERM, Reason::OptionRefused, Some((l, n)))
            );
        }
    }

    #[test]
    fn option_sizes_are_exact() {
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &[1, 0]));
        assert_eq!(plan(&v4(), &r).unwrap_err().reason, Reason::Malformed);
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_TCP, libc::TCP_CONGESTION, b"cubic"));
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
        let p = plan(&v4(), &r).unwrap();
        assert_eq!(p.opts.len(), 2);
    }

    #[test]
    fn bind_address_no_port_is_never_applied() {
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &int(1)));
        assert!(plan(&v4(), &r).unwrap().opts.is_empty());
    }

    #[test]
    fn port_left_to_connect_only_for_guarded_tcp_egress_of_dynamic_endpoints() {
        let tcp = plan(&v4(), &req(libc::AF_INET, libc::SOCK_STREAM, 0)).unwrap();
        let udp = plan(&v4(), &req(libc::AF_INET, libc::SOCK_DGRAM, 0)).unwrap();
        let dynamic = EndpointAddr::Ipv4 {
            addr: std::net::Ipv4Addr::LOCALHOST,
            port: None,
        };
        let dyn_tcp = plan(&dynamic, &req(libc::AF_INET, libc::SOCK_STREAM, 0)).unwrap();
        assert!(port_at_connect(&dyn_tcp, Purpose::Egress, true));
        assert!(
            !port_at_connect(&dyn_tcp, Purpose::Egress, false),
            "no guard"
        );
        assert!(!port_at_connect(&dyn_tcp, Purpose::Ingress, true));
        assert!(!port_at_connect(&tcp, Purpose::Egress, true), "fixed port");
        let dyn_udp = plan(&dynamic, &req(libc::AF_INET, libc::SOCK_DGRAM, 0)).unwrap();
        assert!(!port_at_connect(&dyn_udp, Purpose::Egress, true));
        assert!(!port_at_connect(&udp, Purpose::Egress, true));
    }

    #[test]
    fn families_map_to_the_endpoint() {
        let p = plan(&v4(), &req(libc::AF_INET6, libc::SOCK_STREAM, 0)).unwrap();
        assert_eq!(
            p.bind,
            BindAddr::V6("[::ffff:127.0.0.1]:8080".parse().unwrap())
        );
        let mut r = req(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &int(1)));
        assert_eq!(plan(&v4(), &r).unwrap_err().reason, Reason::FamilyMismatch);
        let mut r = req(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &int(0)));
        assert!(plan(&v4(), &r).is_ok());
        let v6 = EndpointAddr::Ipv6 {
            addr: "::1".parse().unwrap(),
            port: None,
        };
        let e = plan(&v6, &req(libc::AF_INET, libc::SOCK_STREAM, 0)).unwrap_err();
        assert_eq!(
            (e.errno, e.reason),
            (libc::EAFNOSUPPORT, Reason::FamilyMismatch)
        );
        let unix = EndpointAddr::Unix {
            path: "/run/x".into(),
        };
        // An INET stream socket on a unix endpoint: a unix listener at the
        // path, TCP options dropped, escape options still refused.
        let mut r = req(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP);
        assert!(r.push_opt(libc::IPPROTO_TCP, libc::TCP_NODELAY, &int(1)));
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
        let p = plan(&unix, &r).unwrap();
        assert_eq!(
            (p.family, p.sotype, p.protocol, &p.bind),
            (
                libc::AF_UNIX,
                libc::SOCK_STREAM,
                0,
                &BindAddr::Unix("/run/x".into())
            )
        );
        assert_eq!(p.opts.len(), 1);
        assert_eq!(p.opts[0].name, libc::SO_REUSEADDR);
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        r.purpose = Purpose::Egress;
        assert_eq!(
            plan(&unix, &r).unwrap().bind,
            BindAddr::UnixConnect("/run/x".into())
        );
        assert!(r.push_opt(libc::IPPROTO_IP, libc::IP_UNICAST_IF, &int(1)));
        assert_eq!(plan(&unix, &r).unwrap_err().reason, Reason::OptionRefused);
        let e = plan(&unix, &req(libc::AF_INET, libc::SOCK_DGRAM, 0)).unwrap_err();
        assert_eq!(
            (e.errno, e.reason),
            (libc::ESOCKTNOSUPPORT, Reason::FamilyMismatch)
        );
        assert!(plan(&unix, &req(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0)).is_ok());
        assert_eq!(
            plan(&v4(), &req(libc::AF_UNIX, libc::SOCK_STREAM, 0))
                .unwrap_err()
                .errno,
            libc::EAFNOSUPPORT
        );
        assert_eq!(
            plan(&v4(), &req(libc::AF_PACKET, libc::SOCK_RAW, 0))
                .unwrap_err()
                .errno,
            libc::EAFNOSUPPORT
        );
    }

    #[test]
    fn types_and_protocols_are_checked() {
        assert!(plan(
            &v4(),
            &req(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP)
        )
        .is_ok());
        assert!(plan(
            &v4(),
            &req(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_TCP)
        )
        .is_ok());
        assert_eq!(
            plan(
                &v4(),
                &req(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_UDP)
            )
            .unwrap_err()
            .errno,
            libc::EPROTONOSUPPORT
        );
        assert_eq!(
            plan(&v4(), &req(libc::AF_INET, libc::SOCK_RAW, 0))
                .unwrap_err()
                .errno,
            libc::ESOCKTNOSUPPORT
        );
        assert_eq!(
            plan(&v4(), &req(libc::AF_INET, libc::SOCK_SEQPACKET, 0))
                .unwrap_err()
                .errno,
            libc::ESOCKTNOSUPPORT
        );
        let e = plan(
            &v4(),
            &req(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0),
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::Malformed);
    }

    struct Refuser;
    impl crate::ebpf_hooks::Hooks for Refuser {
        fn socket_handed_out(
            &self,
            _sock: std::os::fd::BorrowedFd<'_>,
            _ep: &crate::ebpf_hooks::EndpointRef<'_>,
            _purpose: Purpose,
        ) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EACCES))
        }
    }

    fn ctx_with(hooks: Box<dyn crate::ebpf_hooks::Hooks>) -> (Ctx, NetnsId) {
        let (fd, own) = crate::netns::open_own().unwrap();
        let mut st = crate::state::State::new(own);
        let ns = NetnsId { dev: 4, ino: 77 };
        let spec = graft_core::EndpointSpec {
            name: EndpointName::new("ep").unwrap(),
            addr: EndpointAddr::Ipv4 {
                addr: "127.0.0.1".parse().unwrap(),
                port: None,
            },
            netns: None,
            policy: vec![],
            limit: None,
        };
        st.check_add(ns, &spec, own).unwrap();
        st.insert(ns, fd, spec, own, Target::Own);
        let ctx = Ctx {
            state: std::sync::Mutex::new(st),
            hooks,
            broker_name: "test".into(),
            store: None,
        };
        (ctx, ns)
    }

    fn bytes(r: &Request) -> Vec<u8> {
        let mut b = [0u8; REQUEST_LEN];
        r.encode(&mut b);
        b.to_vec()
    }

    #[test]
    fn handle_serves_only_the_namespace_table() {
        let (ctx, ns) = ctx_with(Box::new(crate::ebpf_hooks::NoHooks));
        let mut lb = LogBudget::default();
        let (r, fd) = handle(
            &ctx,
            ns,
            &bytes(&req(libc::AF_INET, libc::SOCK_STREAM, 0)),
            &mut lb,
        );
        assert_eq!((r.errno, fd.len()), (0, 1));
        let other = NetnsId { dev: 4, ino: 78 };
        let (r, fd) = handle(
            &ctx,
            other,
            &bytes(&req(libc::AF_INET, libc::SOCK_STREAM, 0)),
            &mut lb,
        );
        assert_eq!(
            (r.errno, r.reason, fd.is_empty()),
            (libc::EADDRNOTAVAIL, Reason::NoEndpoint, true)
        );
        let (r, _) = handle(&ctx, ns, &[0u8; 10], &mut lb);
        assert_eq!((r.errno, r.reason), (libc::EINVAL, Reason::Malformed));
    }

    #[test]
    fn rules_come_as_a_sealed_blob_of_the_callers_namespace_only() {
        use std::io::Read;
        let (ctx, ns) = ctx_with(Box::new(crate::ebpf_hooks::NoHooks));
        let rules = graft_core::nsrules::NsRules {
            ingress: vec!["0.0.0.0:80=ep".into()],
            ..Default::default()
        };
        ctx.state().set_rules(ns, &rules).unwrap();
        let mut lb = LogBudget::default();
        let read = |ns| {
            let (r, fds) = handle(
                &ctx,
                ns,
                &bytes(&Request::rules()),
                &mut LogBudget::default(),
            );
            assert_eq!((r.op, r.errno, fds.len()), (Op::Rules, 0, 1));
            let mut b = Vec::new();
            std::fs::File::from(fds.into_iter().next().unwrap())
                .read_to_end(&mut b)
                .unwrap();
            graft_core::nsrules::NsRules::from_blob(&b).unwrap()
        };
        assert_eq!(read(ns), rules);
        assert!(read(NetnsId { dev: 4, ino: 78 }).is_empty());
        let mut bad = bytes(&Request::rules());
        bad[8] = b'x';
        let (r, fds) = handle(&ctx, ns, &bad, &mut lb);
        assert_eq!(
            (r.op, r.errno, r.reason, fds.len()),
            (Op::Rules, libc::EINVAL, Reason::Malformed, 0)
        );
    }

    #[test]
    fn a_refusing_hook_fails_closed() {
        let (ctx, ns) = ctx_with(Box::new(Refuser));
        let mut lb = LogBudget::default();
        let (r, fd) = handle(
            &ctx,
            ns,
            &bytes(&req(libc::AF_INET, libc::SOCK_STREAM, 0)),
            &mut lb,
        );
        assert_eq!(
            (r.errno, r.reason, fd.is_empty()),
            (libc::EACCES, Reason::Policy, true)
        );
        let mut b = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        b.op = Op::SocketBatch;
        b.purpose = Purpose::Egress;
        let (r, fd) = handle(&ctx, ns, &bytes(&b), &mut lb);
        assert_eq!(
            (r.op, r.errno, r.reason, fd.is_empty()),
            (Op::SocketBatch, libc::EACCES, Reason::Policy, true)
        );
        let ep = ctx
            .state()
            .lookup(ns, &EndpointName::new("ep").unwrap())
            .unwrap();
        // One refusal each for the single socket and the batch.
        assert_eq!((ep.stats().sockets, ep.stats().refused), (0, 2));
    }

    #[test]
    fn a_batch_is_eight_bound_sockets_each_counted() {
        let (ctx, ns) = ctx_with(Box::new(crate::ebpf_hooks::NoHooks));
        let mut lb = LogBudget::default();
        let mut b = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        b.op = Op::SocketBatch;
        b.purpose = Purpose::Egress;
        let (r, fds) = handle(&ctx, ns, &bytes(&b), &mut lb);
        assert_eq!(
            (r.op, r.errno, fds.len()),
            (Op::SocketBatch, 0, BATCH_FIRST)
        );
        let mut ports: Vec<u16> = fds
            .iter()
            .map(|f| {
                let a = sys::getsockname(f.as_fd()).unwrap();
                assert_eq!(&a[4..8], &[127, 0, 0, 1]);
                u16::from_be_bytes([a[2], a[3]])
            })
            .collect();
        assert_eq!(&r.addr_bytes()[2..4], &ports[0].to_be_bytes());
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), BATCH_FIRST, "each socket has its own port");
        let ep = ctx
            .state()
            .lookup(ns, &EndpointName::new("ep").unwrap())
            .unwrap();
        assert_eq!(ep.stats().sockets, BATCH_FIRST as u64);
        // Options or ingress: malformed, nothing made.
        let mut bad = b.clone();
        assert!(bad.push_opt(libc::IPPROTO_TCP, libc::TCP_NODELAY, &int(1)));
        let (r, fds) = handle(&ctx, ns, &bytes(&bad), &mut lb);
        assert_eq!(
            (r.op, r.errno, r.reason, fds.len()),
            (Op::SocketBatch, libc::EINVAL, Reason::Malformed, 0)
        );
    }

    #[test]
    fn lookup_address_is_the_configured_one() {
        let b = configured_sockaddr(&v4());
        assert_eq!(&b[2..8], &[0x1f, 0x90, 127, 0, 0, 1]);
    }
}
