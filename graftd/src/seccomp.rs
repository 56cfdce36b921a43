//! seccomp mode: serving the listeners `graft` launchers hand over.
//!
//! A launcher in seccomp mode installs a user-notification filter (see
//! `graft-seccomp`) and sends an `Op::Attach` record on its namespace's
//! broker; graftd takes the listener from it with `pidfd_getfd` and serves
//! it on a thread of its own, so a slow or stuck program never delays
//! another namespace (or another program).
//!
//! For each trapped call: read the address from the caller's memory, check
//! the notification is still pending (the pid was not reused), decide with
//! the same rules as the preload library (ingress on `bind`, egress on
//! `connect`/`sendto`/`sendmsg`/`sendmmsg`, exclusions, longest prefix),
//! take the caller's socket with `pidfd_getfd` to learn its kind, options
//! and flags, make the host socket through the broker's own request path
//! (same checks, factory, eBPF hooks, counters and logs), put it over the
//! caller's descriptor with `SECCOMP_IOCTL_NOTIF_ADDFD`, then complete
//! `bind` (graftd bound it already) or let `connect`/`send*` continue in
//! the kernel. Everything else continues untouched.
//!
//! CONTINUE re-reads the address from the caller's memory, which another of
//! its threads may have changed after graftd read it: the endpoint's
//! in-kernel egress policy is what guards the real destination.
//!
//! Where the kernel allows it ([`probe`]), a supervisor waits in the
//! listener's `recv` with the same-CPU hand-over, so the trapped thread and
//! graftd take turns on one CPU; it keeps a pidfd per program thread.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use graft_core::call::Call;
use graft_core::proto::broker::{
    Attach, Op, Purpose, Reason, Reply, Request, ATTACH_VERBOSE, REQUEST_LEN,
};
use graft_core::rules::{BindMatch, EgressDecision, RuleSet};
use graft_core::sockaddr;
use graft_core::sockopt::{Class, SNAPSHOT, SO_NETNS_COOKIE};
use graft_core::{EndpointName, NetnsId};
use graft_seccomp::{notify, pidfd, sockopt};

use crate::broker::{self, LogBudget};
use crate::sys;
use crate::Ctx;

/// Most listeners served at once (one thread each).
pub const MAX_LISTENERS: usize = 512;
/// Sockets bound to port 0 remembered per listener (see `Supervisor::port0`).
const PORT0_MEMORY: usize = 1024;
/// Pidfds of a program's threads kept per listener (see `Supervisor::pidfd`).
const PIDFD_MEMORY: usize = 64;

static LISTENERS: AtomicUsize = AtomicUsize::new(0);

/// Whether a supervisor may wait for calls in `recv` itself, which the
/// kernel's same-CPU hand-over needs (see [`probe`]).
static RECV_WAITS: AtomicBool = AtomicBool::new(false);

/// Finds out, in the background, whether this kernel ends a `recv` whose
/// program exited (Linux 6.11). If it does, supervisors wait in `recv` with
/// the listener set to hand calls over on the caller's CPU (Linux 6.6):
/// the trapped thread sleeps while graftd answers, so on a small machine
/// this saves two cross-CPU wake-ups per trapped call, most of what a
/// trapped `connect` cost. Until then, and on older kernels, they poll.
pub fn probe() {
    let spawned = std::thread::Builder::new()
        .name("seccomp-probe".into())
        .spawn(|| {
            let ok = notify::recv_ends_when_orphaned(std::time::Duration::from_millis(500));
            RECV_WAITS.store(ok, Ordering::Relaxed);
            log::debug!(
                "seccomp supervisors {} in recv (same-CPU hand-over)",
                if ok { "wait" } else { "cannot wait" }
            );
        });
    if let Err(e) = spawned {
        log::debug!("cannot probe the seccomp listener: {e}");
    }
}

/// Answers an `Op::Attach` record from connection `conn` of `ns`'s broker.
pub fn attach(ctx: &Arc<Ctx>, ns: NetnsId, conn: BorrowedFd<'_>, rec: &[u8]) -> Reply {
    let refuse = |errno, reason| Reply::err(Op::Attach, errno, reason);
    let a = match Attach::decode(rec) {
        Ok(a) => a,
        Err(e) => {
            log::debug!("broker for {ns}: malformed attach request: {e}");
            return refuse(libc::EINVAL, Reason::Malformed);
        }
    };
    // Cannot fail: decode checked that the rules parse.
    if a.rules().is_err() {
        return refuse(libc::EINVAL, Reason::Malformed);
    }
    let listener = match take_listener(conn, a.listener_fd) {
        Ok(l) => l,
        Err(e) => {
            log::info!("broker for {ns}: cannot take the seccomp listener: {e}");
            return refuse(e.raw_os_error().unwrap_or(libc::EBADF), Reason::Malformed);
        }
    };
    let Some(pid) = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .and_then(|c| u32::try_from(c.pid()).ok())
    else {
        return refuse(libc::EINVAL, Reason::Malformed);
    };
    // Written down before the reply: the program runs only once it has it.
    let record = crate::adopt::record(ctx, ns, pid, &a);
    match serve(ctx, ns, &a, listener, pid, record) {
        Ok(()) => Reply::ok(Op::Attach, &[]),
        Err(errno) => refuse(errno, Reason::SocketFailed),
    }
}

/// Serves `listener`, attached by process `pid` through `ns`'s broker with
/// `a`'s rules, on a thread of its own until its program is gone; `record`
/// (see [`crate::adopt`]) goes with it. Err: the errno to refuse with.
pub fn serve(
    ctx: &Arc<Ctx>,
    ns: NetnsId,
    a: &Attach,
    listener: OwnedFd,
    pid: u32,
    record: Option<crate::adopt::Record>,
) -> Result<(), i32> {
    // Cannot fail for an attach (decode checked that the rules parse); a
    // record edited by hand can.
    let Ok(rules) = a.rules() else {
        log::info!("seccomp listener of pid {pid} in {ns}: its rules do not parse");
        return Err(libc::EINVAL);
    };
    if LISTENERS.fetch_add(1, Ordering::SeqCst) >= MAX_LISTENERS {
        LISTENERS.fetch_sub(1, Ordering::SeqCst);
        log::warn!("broker for {ns}: {MAX_LISTENERS} seccomp listeners served, refusing another");
        return Err(libc::EAGAIN);
    }
    // Before the reply: the program, exec'd once it has it, makes its
    // sockets under the watch.
    let watch = ctx.hooks.watch_options(pid);
    let sup = Supervisor {
        ctx: Arc::clone(ctx),
        ns,
        rules,
        verbose: a.flags & ATTACH_VERBOSE != 0,
        listener,
        budget: LogBudget::default(),
        port0: VecDeque::new(),
        fresh: Vec::new(),
        ns_cookie: std::cell::Cell::new(None),
        pidfds: Vec::new(),
        watch,
        _record: record,
    };
    let spawned = std::thread::Builder::new()
        .name("seccomp".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sup.run()));
            LISTENERS.fetch_sub(1, Ordering::SeqCst);
            if r.is_err() {
                log::error!("a seccomp supervisor panicked; its program's trapped calls fail");
            }
        });
    match spawned {
        Ok(_) => {
            log::debug!("broker for {ns}: serving a seccomp listener");
            Ok(())
        }
        Err(e) => {
            LISTENERS.fetch_sub(1, Ordering::SeqCst);
            log::warn!("broker for {ns}: cannot start a seccomp supervisor: {e}");
            Err(libc::EAGAIN)
        }
    }
}

/// Whether `fd` is a seccomp listener.
fn is_listener(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:seccomp notify")
}

/// The peer's descriptor `fd`, if it is a seccomp listener.
fn take_listener(conn: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    listener_at(pidfd::of_peer(conn)?.as_fd(), fd)
}

/// The process's descriptor `fd`, if it is a seccomp listener (EINVAL if
/// it is something else).
pub fn listener_at(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    let l = pidfd::getfd(pidfd, fd)?;
    if !is_listener(l.as_fd()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(l)
}

/// What to answer a trapped call with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Continue,
    /// graftd did the call: it returns 0.
    Done,
    Fail(libc::c_int),
    /// The call is gone (the caller died or was interrupted): no answer.
    Gone,
}

/// The caller's socket, as graftd sees it through `pidfd_getfd`.
struct AppSocket {
    sock: OwnedFd,
    family: libc::c_int,
    sotype: libc::c_int,
    protocol: libc::c_int,
    /// The eBPF companion's record of it (made in a watched cgroup):
    /// `None`, its history is unknown.
    recorded: Option<graft_ebpf::AppSocket>,
    /// Read when first needed (only sockets bound to port 0 are told by
    /// it): most trapped connects never ask.
    inode: std::cell::OnceCell<u64>,
}

impl AppSocket {
    /// The socket's inode (0 if it cannot be read: no socket has it).
    fn inode(&self) -> u64 {
        *self
            .inode
            .get_or_init(|| nix::sys::stat::fstat(self.sock.as_raw_fd()).map_or(0, |st| st.st_ino))
    }

    fn stream(&self) -> bool {
        self.sotype == libc::SOCK_STREAM
    }

    /// An AF_INET6 socket that also takes IPv4 (IPV6_V6ONLY off).
    fn v6only_off(&self) -> bool {
        self.family == libc::AF_INET6
            && sockopt::get_int(self.sock.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).ok()
                == Some(0)
    }
}

/// What graftd is asked to make for one trapped call: the endpoint (and,
/// for a dual-stack `[::]` listener, the IPv6 endpoint it also answers on).
struct Want {
    call: Call,
    fd: i32,
    sa: SocketAddr,
    ep: EndpointName,
    ep_v6: bool,
    purpose: Purpose,
    dual: Option<EndpointName>,
}

struct Supervisor {
    ctx: Arc<Ctx>,
    ns: NetnsId,
    rules: RuleSet,
    verbose: bool,
    listener: OwnedFd,
    budget: LogBudget,
    /// Sockets the program bound to port 0 itself (by inode): like the
    /// preload library, graft decides at their first connect/send whether
    /// they are clients of an egress endpoint.
    port0: VecDeque<u64>,
    /// Option values of fresh sockets, per (family, type, protocol).
    fresh: Vec<((libc::c_int, libc::c_int, libc::c_int), Defaults)>,
    /// The netns cookie of `ns`, once a program socket showed it (cookies
    /// are never reused): later sockets are checked with one getsockopt
    /// instead of opening their namespace.
    ns_cookie: std::cell::Cell<Option<u64>>,
    /// Pidfds of the program's threads, oldest first.
    pidfds: Vec<(libc::pid_t, Arc<OwnedFd>)>,
    /// The eBPF companion's recording of the program's sockets (what each
    /// was made as, the options set on it), while this listener is served.
    watch: Option<Box<dyn Send>>,
    /// This listener written down, so a restarted graftd serves it again;
    /// removed with the supervisor (the program is gone).
    _record: Option<crate::adopt::Record>,
}

impl Supervisor {
    fn run(mut self) {
        let in_recv =
            RECV_WAITS.load(Ordering::Relaxed) && notify::sync_wake_up(self.listener.as_fd());
        loop {
            if !in_recv && !self.wait_polling() {
                return;
            }
            let n = match notify::recv(self.listener.as_fd()) {
                Ok(n) => n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => {
                    // ENOENT: a caller died before it was read, or (when
                    // waiting in recv) every process under the filter did.
                    let l = self.listener.as_fd();
                    if in_recv && notify::pending(l, false).ok() == Some(notify::Pending::Orphaned)
                    {
                        log::debug!("seccomp listener of {}: program exited", self.ns);
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    log::warn!("seccomp listener of {}: receive: {e}", self.ns);
                    return;
                }
            };
            let verdict = self.decide(&n);
            let l = self.listener.as_fd();
            let sent = match verdict {
                Verdict::Continue => notify::continue_call(l, n.id),
                Verdict::Done => notify::complete(l, n.id, 0),
                Verdict::Fail(e) => notify::fail(l, n.id, e),
                Verdict::Gone => Ok(()),
            };
            if let Err(e) = sent {
                // ENOENT: the caller was interrupted or died meanwhile.
                log::debug!("seccomp listener of {}: answer: {e}", self.ns);
            }
        }
    }

    /// Waits until a call is there; false once every process under the
    /// filter is gone.
    fn wait_polling(&self) -> bool {
        loop {
            match notify::pending(self.listener.as_fd(), true) {
                Ok(notify::Pending::Call) => return true,
                Ok(notify::Pending::Orphaned) => {
                    log::debug!("seccomp listener of {}: program exited", self.ns);
                    return false;
                }
                Ok(notify::Pending::Nothing) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("seccomp listener of {}: poll: {e}", self.ns);
                    return false;
                }
            }
        }
    }

    fn decide(&mut self, n: &notify::Notif) -> Verdict {
        let Some(call) = Call::of_nr(i64::from(n.data.nr)) else {
            return Verdict::Continue;
        };
        let pid = n.pid as libc::pid_t;
        let a = n.data.args;
        let fd = a[0] as i32;
        // Nothing to do for a direction without rules.
        let wanted = match call {
            Call::Bind => !self.rules.ingress.is_empty() || !self.rules.egress.is_empty(),
            Call::Listen => !self.rules.ingress.is_empty(),
            _ => !self.rules.egress.is_empty(),
        };
        if wanted && call == Call::Listen {
            return self.decide_listen(n, fd);
        }
        if !wanted {
            return Verdict::Continue;
        }
        let (ptr, len) = match call {
            Call::Bind | Call::Connect => (a[1], a[2] as u32),
            Call::Listen => return Verdict::Continue,
            Call::Sendto => (a[4], a[5] as u32),
            Call::Sendmmsg if a[2] == 0 => return Verdict::Continue,
            // struct msghdr starts with msg_name, msg_namelen (mmsghdr too).
            Call::Sendmsg | Call::Sendmmsg => {
                let mut h = [0u8; 12];
                match pidfd::read_mem(pid, a[1], &mut h) {
                    Ok(12) => {}
                    _ => return Verdict::Continue,
                }
                let p = u64::from_ne_bytes(h[..8].try_into().unwrap_or([0; 8]));
                let l = u32::from_ne_bytes(h[8..12].try_into().unwrap_or([0; 4]));
                (p, l)
            }
        };
        if ptr == 0 || len < 2 {
            return Verdict::Continue;
        }
        let mut raw = [0u8; 28];
        let want = (len as usize).min(raw.len());
        let got = match pidfd::read_mem(pid, ptr, &mut raw[..want]) {
            Ok(g) => g,
            // The kernel will fail the call with EFAULT itself.
            Err(_) => return Verdict::Continue,
        };
        if !notify::id_valid(self.listener.as_fd(), n.id) {
            return Verdict::Gone;
        }
        let Some(sa) = sockaddr::parse(&raw[..got]) else {
            return Verdict::Continue;
        };
        let fresh = matches!(call, Call::Bind | Call::Connect);
        let (pfd, app) = match self.app_socket(n, fd, Some(&sa), fresh) {
            Ok((p, Some(a))) => (p, a),
            Ok((_, None)) => return Verdict::Continue,
            Err(v) => return v,
        };
        let bound = bound_port(app.sock.as_fd());
        let connected = nix::sys::socket::getpeername::<nix::sys::socket::SockaddrStorage>(
            app.sock.as_raw_fd(),
        )
        .is_ok();
        let (ep, ep_v6, purpose) = match call {
            Call::Bind => {
                if bound.is_some() || connected {
                    return Verdict::Continue;
                }
                if sa.port() == 0 {
                    // A client's bind before connecting: decided at its
                    // first connect/send (as in the preload library).
                    if !self.rules.egress.is_empty() || !self.rules.ingress.is_empty() {
                        self.remember_port0(app.inode());
                    }
                    return Verdict::Continue;
                }
                match self
                    .rules
                    .match_bind(sa.ip(), sa.port(), app.stream(), || app.v6only_off())
                {
                    Some(BindMatch::One { ep, v6 }) => (ep, v6, Purpose::Ingress),
                    Some(BindMatch::Dual { ep4, ep6 }) => {
                        return self.graft_dual(n, pfd.as_fd(), &app, (call, fd, sa), (ep4, ep6));
                    }
                    None => return Verdict::Continue,
                }
            }
            _ => {
                if connected {
                    return Verdict::Continue;
                }
                let was_port0 = self.bound_to_port0(&app);
                if bound.is_some() && !was_port0 {
                    // Bound by the program to a port of its choosing: the
                    // container's, as in the preload library.
                    return Verdict::Continue;
                }
                match self.rules.match_egress(sa.ip()) {
                    EgressDecision::Graft(ep) => {
                        if was_port0 {
                            self.port0.retain(|&i| i != app.inode());
                            if let Some(line) = epoll_refusal(pid, fd, app.inode()) {
                                let head = format!("{} {sa}: endpoint \"{ep}\"", call.name());
                                self.tell(pfd.as_fd(), &format!("{head}: {line}"));
                                return Verdict::Fail(libc::EPERM);
                            }
                        }
                        (ep, sa.ip().to_canonical().is_ipv6(), Purpose::Egress)
                    }
                    _ => return Verdict::Continue,
                }
            }
        };
        let want = Want {
            call,
            fd,
            sa,
            ep,
            ep_v6,
            purpose,
            dual: None,
        };
        self.graft(n, pfd.as_fd(), &app, &want)
            .unwrap_or(Verdict::Fail(libc::EPROTO))
    }

    /// A dual-stack `[::]` listener matching an IPv4 and an IPv6 rule: one
    /// listener answering on both endpoints, as in preload mode; when
    /// graftd cannot make one, the IPv6 endpoint alone, with one line.
    fn graft_dual(
        &mut self,
        n: &notify::Notif,
        pfd: BorrowedFd<'_>,
        app: &AppSocket,
        (call, fd, sa): (Call, i32, SocketAddr),
        (ep4, ep6): (EndpointName, EndpointName),
    ) -> Verdict {
        let mut want = Want {
            call,
            fd,
            sa,
            ep: ep4,
            ep_v6: false,
            purpose: Purpose::Ingress,
            dual: Some(ep6),
        };
        if let Some(v) = self.graft(n, pfd, app, &want) {
            return v;
        }
        self.tell(
            pfd,
            &format!(
                "{} {sa}: no dual-stack listener on \"{ep4}\" and \"{ep6}\" (graftd's log says \
                 why; it needs graftd's eBPF companion): answering on \"{ep6}\" only",
                call.name()
            ),
        );
        want.ep = ep6;
        want.ep_v6 = true;
        want.dual = None;
        self.graft(n, pfd, app, &want)
            .unwrap_or(Verdict::Fail(libc::EPROTO))
    }

    /// `listen()` on a socket without a port of the program's choosing
    /// (unbound, or bound to port 0 earlier): a server after all, grafted
    /// now when an ingress rule covers port 0 of its address (as the preload
    /// library does); the listen then continues on the host socket.
    fn decide_listen(&mut self, n: &notify::Notif, fd: i32) -> Verdict {
        let (pfd, app) = match self.app_socket(n, fd, None, true) {
            Ok((p, Some(a))) => (p, a),
            Ok((_, None)) => return Verdict::Continue,
            Err(v) => return v,
        };
        if app.sotype != libc::SOCK_STREAM {
            return Verdict::Continue;
        }
        let connected = nix::sys::socket::getpeername::<nix::sys::socket::SockaddrStorage>(
            app.sock.as_raw_fd(),
        )
        .is_ok();
        let bound = sys::getsockname(app.sock.as_fd())
            .ok()
            .and_then(|b| sockaddr::parse(&b));
        let ip = match bound {
            _ if connected => return Verdict::Continue,
            Some(b) if b.port() == 0 => b.ip(),
            Some(b) if self.bound_to_port0(&app) => b.ip(),
            Some(_) => return Verdict::Continue,
            None => return Verdict::Continue,
        };
        let sa = SocketAddr::new(ip, 0);
        let Some(m) = self
            .rules
            .match_bind(ip, 0, app.stream(), || app.v6only_off())
        else {
            return Verdict::Continue;
        };
        self.port0.retain(|&i| i != app.inode());
        let (ep, v6) = match m {
            BindMatch::One { ep, v6 } => (ep, v6),
            BindMatch::Dual { ep4, ep6 } => {
                return self.graft_dual(n, pfd.as_fd(), &app, (Call::Listen, fd, sa), (ep4, ep6));
            }
        };
        let want = Want {
            call: Call::Listen,
            fd,
            sa,
            ep,
            ep_v6: v6,
            purpose: Purpose::Ingress,
            dual: None,
        };
        self.graft(n, pfd.as_fd(), &app, &want)
            .unwrap_or(Verdict::Fail(libc::EPROTO))
    }

    /// Whether the program bound `app` to port 0 itself (see `port0`);
    /// its inode is read only when some such socket is pending.
    fn bound_to_port0(&self, app: &AppSocket) -> bool {
        !self.port0.is_empty() && self.port0.contains(&app.inode())
    }

    fn remember_port0(&mut self, inode: u64) {
        if self.port0.len() >= PORT0_MEMORY {
            self.port0.pop_front();
        }
        self.port0.push_back(inode);
    }

    /// A pidfd of the trapped thread of call `n`. One is kept per thread
    /// (up to [`PIDFD_MEMORY`]), which saves opening and closing one per
    /// call; with `fresh`, the kept one is replaced. Fails the call when the
    /// thread is still waiting yet cannot be reached (graftd out of
    /// descriptors?), rather than let a call that may need grafting through.
    fn pidfd(&mut self, n: &notify::Notif, fresh: bool) -> Result<Arc<OwnedFd>, Verdict> {
        let tid = n.pid as libc::pid_t;
        if !fresh {
            if let Some((_, p)) = self.pidfds.iter().find(|(t, _)| *t == tid) {
                return Ok(Arc::clone(p));
            }
        }
        self.pidfds.retain(|(t, _)| *t != tid);
        let p = match pidfd::open_thread(tid) {
            Ok(p) => Arc::new(p),
            Err(e) if notify::id_valid(self.listener.as_fd(), n.id) => {
                log::warn!("seccomp listener of {}: pidfd of {tid}: {e}", self.ns);
                return Err(Verdict::Fail(libc::EAGAIN));
            }
            Err(_) => return Err(Verdict::Gone),
        };
        // The thread was still waiting after the pidfd was made: the pidfd
        // is the trapped thread's, not an earlier holder's of its number.
        if !notify::id_valid(self.listener.as_fd(), n.id) {
            return Err(Verdict::Gone);
        }
        if self.pidfds.len() >= PIDFD_MEMORY {
            self.pidfds.remove(0);
        }
        self.pidfds.push((tid, Arc::clone(&p)));
        Ok(p)
    }

    /// The trapped thread's pidfd, and its descriptor `fd` if that is an
    /// AF_INET/AF_INET6 stream or datagram socket of the family of `sa`,
    /// living in the program's own namespace (a host socket, grafted
    /// already, is left alone). `fresh`: the call is one a socket grafted
    /// already does not make (bind, connect, listen), so the companion's
    /// record is asked first; sends also come on grafted sockets, which
    /// have none, so for them the socket's namespace is asked first.
    fn app_socket(
        &mut self,
        n: &notify::Notif,
        fd: i32,
        sa: Option<&SocketAddr>,
        fresh: bool,
    ) -> Result<(Arc<OwnedFd>, Option<AppSocket>), Verdict> {
        let mut pfd = self.pidfd(n, false)?;
        let mut got = pidfd::getfd(pfd.as_fd(), fd);
        if matches!(&got, Err(e) if e.raw_os_error() == Some(libc::ESRCH)) {
            // A kept pidfd of a thread that ended since; its number now
            // names the trapped thread, which is still waiting.
            pfd = self.pidfd(n, true)?;
            got = pidfd::getfd(pfd.as_fd(), fd);
        }
        // Any other failure (EBADF): the kernel fails the call itself.
        let app = got
            .ok()
            .and_then(|sock| self.app_socket_kind(sock, sa, fresh));
        Ok((pfd, app))
    }

    /// The companion's record of the program's socket `sock`, when its
    /// sockets are being recorded.
    fn record(&self, sock: BorrowedFd<'_>) -> Option<graft_ebpf::AppSocket> {
        self.watch.as_ref()?;
        self.ctx.hooks.app_socket(sock)
    }

    fn app_socket_kind(
        &self,
        sock: OwnedFd,
        sa: Option<&SocketAddr>,
        fresh: bool,
    ) -> Option<AppSocket> {
        // A socket the program made in a watched cgroup: its namespace and
        // kind as recorded when it was made, not asked of it (four
        // getsockopt calls). A socket grafted already was made by graftd
        // and has no record.
        let early = if fresh {
            self.record(sock.as_fd())
        } else {
            None
        };
        // First: a socket grafted already (every later sendto with an
        // address on it is trapped too) is told by this one check.
        if !self.in_our_netns(sock.as_fd(), early.map(|r| r.netns_cookie)) {
            return None;
        }
        let recorded = if fresh {
            early
        } else {
            self.record(sock.as_fd())
        };
        let (family, sotype, protocol) = match recorded.and_then(|r| r.kind) {
            Some(k) => k,
            None => {
                let int = |name| sockopt::get_int(sock.as_fd(), libc::SOL_SOCKET, name).ok();
                (
                    int(libc::SO_DOMAIN)?,
                    int(libc::SO_TYPE)?,
                    int(libc::SO_PROTOCOL)?,
                )
            }
        };
        let fits = match sa {
            Some(SocketAddr::V4(_)) => family == libc::AF_INET,
            Some(SocketAddr::V6(_)) => family == libc::AF_INET6,
            None => family == libc::AF_INET || family == libc::AF_INET6,
        };
        if !fits || !(sotype == libc::SOCK_STREAM || sotype == libc::SOCK_DGRAM) {
            return None;
        }
        Some(AppSocket {
            sock,
            family,
            sotype,
            protocol,
            recorded,
            inode: std::cell::OnceCell::new(),
        })
    }

    /// Whether the program's socket `sock` lives in the namespace this
    /// supervisor serves. `recorded`: its netns cookie, when known already.
    fn in_our_netns(&self, sock: BorrowedFd<'_>, recorded: Option<u64>) -> bool {
        let cookie = recorded.or_else(|| {
            let mut b = [0u8; 8];
            matches!(
                sockopt::get(sock, libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut b),
                Ok(8)
            )
            .then(|| u64::from_ne_bytes(b))
        });
        if cookie.is_some() && cookie == self.ns_cookie.get() {
            return true;
        }
        let same = pidfd::socket_netns(sock)
            .and_then(|ns| NetnsId::of_fd(ns.as_fd()))
            .is_ok_and(|id| id == self.ns);
        if same && cookie.is_some() {
            self.ns_cookie.set(cookie);
        }
        same
    }

    /// Writes `graft: LINE` on the program's own stderr (its descriptor 2,
    /// whatever it is), as the preload library would.
    fn tell(&self, pfd: BorrowedFd<'_>, line: &str) {
        if let Ok(err) = pidfd::getfd(pfd, 2) {
            let mut f = std::fs::File::from(err);
            let _ = f.write_all(format!("graft: {line}\n").as_bytes());
        }
    }

    /// Makes the host socket `want` asks for and installs it over the
    /// caller's descriptor; `None` only when a dual-stack listener was asked
    /// for and graftd cannot make one (the caller falls back).
    fn graft(
        &mut self,
        n: &notify::Notif,
        pfd: BorrowedFd<'_>,
        app: &AppSocket,
        want: &Want,
    ) -> Option<Verdict> {
        let Want {
            call,
            fd,
            ep,
            ep_v6,
            purpose,
            ..
        } = *want;
        let sa = &want.sa;
        let head = format!("{} {sa}: endpoint \"{ep}\"", call.name());
        let mut req = match want.dual {
            Some(ep6) => Request::new_dual(ep, ep6, app.family, app.sotype, app.protocol),
            None => Request::new(
                Op::Socket,
                ep,
                app.family,
                app.sotype,
                app.protocol,
                purpose,
            ),
        };
        let kind = (app.family, app.sotype, app.protocol);
        if !self.fresh.iter().any(|(k, _)| *k == kind) {
            match defaults(app.family, app.sotype, app.protocol) {
                Ok(d) => self.fresh.push((kind, d)),
                Err(e) => {
                    self.tell(
                        pfd,
                        &format!(
                            "{head}: cannot read the socket's options to carry them over ({e})"
                        ),
                    );
                    return Some(Verdict::Fail(e.raw_os_error().unwrap_or(libc::EIO)));
                }
            }
        }
        if let Some((_, fresh)) = self.fresh.iter().find(|(k, _)| *k == kind) {
            let set = app.recorded.map(|r| r.options_set);
            let read = snapshot(app, fresh, set, &mut req);
            // Tests read this line: "as recorded" says the kind and the
            // namespace came from the record too.
            log::debug!(
                "seccomp listener of {}: pid {} fd {fd}: read {read} option(s), {}",
                self.ns,
                n.pid,
                match app.recorded {
                    Some(r) if r.kind.is_some() => "as recorded",
                    Some(_) => "as recorded, kind asked",
                    None => "no record",
                }
            );
        }
        let mut rec = [0u8; REQUEST_LEN];
        req.encode(&mut rec);
        let (reply, mut socks) = broker::handle_sized(
            &self.ctx,
            self.ns,
            &rec,
            &mut self.budget,
            broker::Batch::SECCOMP,
        );
        if want.dual.is_some() && reply.reason == Reason::NoDualStack {
            return None;
        }
        if reply.errno != 0 || reply.reason != Reason::None {
            let (errno, line) = failure(call, sa, ep, ep_v6, app.family, &reply);
            self.tell(pfd, &line);
            return Some(Verdict::Fail(errno));
        }
        let Some(new) = socks.pop() else {
            self.tell(
                pfd,
                &format!("{head}: graftd made no socket: check graftd's log"),
            );
            return Some(Verdict::Fail(libc::EPROTO));
        };
        if let Err(e) = self.install(n, fd, &new) {
            if !notify::id_valid(self.listener.as_fd(), n.id) {
                return Some(Verdict::Gone);
            }
            self.tell(
                pfd,
                &format!("{head}: could not install the host socket on fd {fd} ({e})"),
            );
            return Some(Verdict::Fail(e.raw_os_error().unwrap_or(libc::EIO)));
        }
        if self.verbose {
            let host = sys::getsockname(new.as_fd())
                .ok()
                .and_then(|b| sockaddr::parse(&b))
                .map(|h| format!(" (host {})", sockaddr::HostShown(h)))
                .unwrap_or_default();
            self.tell(
                pfd,
                &format!(
                    "pid {} fd {fd} {} {sa} -> {ep}{host} (seccomp)",
                    n.pid,
                    call.name()
                ),
            );
        }
        Some(match call {
            Call::Bind => Verdict::Done,
            _ => Verdict::Continue,
        })
    }

    /// Puts `new` over the caller's `fd`, with the replaced socket's
    /// O_NONBLOCK and the descriptor's close-on-exec flag.
    fn install(&self, n: &notify::Notif, fd: i32, new: &OwnedFd) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        // The file's status flags and the descriptor's close-on-exec flag
        // in one read (no F_GETFL on our copy of the program's socket).
        let flags = fd_flags(n.pid as libc::pid_t, fd)?;
        if flags & libc::O_NONBLOCK as u32 != 0 {
            fcntl(new.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        notify::install_fd(self.listener.as_fd(), n.id, new.as_fd(), fd, cloexec)
    }
}

/// The flags of descriptor `fd` of thread `tid` as its fdinfo shows them:
/// the file's status flags (`O_NONBLOCK`), and `O_CLOEXEC` when the
/// descriptor is close-on-exec.
fn fd_flags(tid: libc::pid_t, fd: i32) -> io::Result<u32> {
    use std::io::Read;
    // One read: the flags line comes second, well within the buffer (a
    // socket's fdinfo is four short lines); no size probe, no read to EOF.
    let mut buf = [0u8; 256];
    let n = std::fs::File::open(format!("/proc/{tid}/fdinfo/{fd}"))?.read(&mut buf)?;
    let info =
        std::str::from_utf8(&buf[..n]).map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
    Ok(flags)
}

/// When socket `inode` (descriptor `fd` of process `pid`) is registered
/// with an epoll instance, the reason it cannot be grafted: replacing the
/// descriptor drops the registration (epoll watches the old socket), and
/// the program would wait forever for events.
fn epoll_refusal(pid: libc::pid_t, fd: i32, inode: u64) -> Option<String> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for e in dir.flatten() {
        let is_epoll =
            std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(
            std::path::Path::new(&format!("/proc/{pid}/fdinfo")).join(e.file_name()),
        ) else {
            continue;
        };
        let watched = info.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("tfd:")
                && w.next() == Some(&fd.to_string())
                && l.split_whitespace().any(|t| {
                    t.strip_prefix("ino:")
                        .and_then(|v| u64::from_str_radix(v, 16).ok())
                        == Some(inode)
                })
        });
        if watched {
            return Some(format!(
                "the socket was bound and added to epoll before its first send, and a \
                 grafted socket cannot inherit that registration: bind it to an address \
                 an ingress rule maps (-i), or send before adding it to epoll (fd {fd})"
            ));
        }
    }
    None
}

/// The port a socket is bound to, if any.
fn bound_port(sock: BorrowedFd<'_>) -> Option<u16> {
    let b = sys::getsockname(sock).ok()?;
    sockaddr::parse(&b).map(|a| a.port()).filter(|&p| p != 0)
}

/// What a fresh socket of one kind reports for each option of
/// [`SNAPSHOT`] (`None`: not readable), in `SNAPSHOT` order.
type Defaults = Vec<Option<([u8; 20], usize)>>;

/// A fresh socket's option values, read once per kind and supervisor (they
/// only change with sysctls, as for a socket made a moment later).
fn defaults(
    family: libc::c_int,
    sotype: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<Defaults> {
    let probe = sys::socket(family, sotype | libc::SOCK_CLOEXEC, protocol)?;
    Ok(SNAPSHOT
        .iter()
        .map(|o| {
            if !o.applies(family, sotype) {
                return None;
            }
            let mut p = [0u8; 20];
            let n = sockopt::get(probe.as_fd(), o.level, o.name, &mut p[..o.kind.size()]).ok()?;
            Some((p, n))
        })
        .collect())
}

/// The options the program set on its socket: those that differ from a
/// fresh socket of the same kind (the preload library's comparison, for a
/// socket whose history graftd did not see). With `set` (the options the
/// eBPF companion saw being set on it, bit i: `SNAPSHOT[i]`), only those
/// are read. Returns how many were read.
fn snapshot(app: &AppSocket, fresh: &Defaults, set: Option<u64>, req: &mut Request) -> usize {
    let mut read = 0;
    for (i, (o, d)) in SNAPSHOT.iter().zip(fresh).enumerate() {
        let Some((p, np)) = d else {
            continue;
        };
        // Options past the 64th have no bit: always read.
        if set.is_some_and(|b| i < 64 && b & (1u64 << i) == 0) {
            continue;
        }
        read += 1;
        let mut a = [0u8; 20];
        let Ok(na) = sockopt::get(app.sock.as_fd(), o.level, o.name, &mut a[..o.kind.size()])
        else {
            continue;
        };
        if a[..na] == p[..*np] {
            continue;
        }
        if o.class == Class::CarryHalved && na == 4 {
            let v = libc::c_int::from_ne_bytes([a[0], a[1], a[2], a[3]]) / 2;
            req.push_opt(o.level, o.name, &v.to_ne_bytes());
        } else {
            req.push_opt(o.level, o.name, &a[..na]);
        }
    }
    read
}

/// The errno and the line for a refused graft, worded as the preload
/// library words them.
fn failure(
    call: Call,
    sa: &SocketAddr,
    ep: EndpointName,
    ep_v6: bool,
    family: libc::c_int,
    r: &Reply,
) -> (libc::c_int, String) {
    let head = format!("{} {sa}: endpoint \"{ep}\"", call.name());
    let errno = if r.errno > 0 { r.errno } else { libc::EIO };
    let errstr = io::Error::from_raw_os_error(errno);
    let errstr = errstr.to_string();
    let errstr = errstr.split(" (os error").next().unwrap_or(&errstr);
    let fam = if ep_v6 { "ipv6" } else { "ipv4" };
    match r.reason {
        Reason::NoEndpoint => (
            call.unreachable_errno(),
            format!(
                "{} {sa}: endpoint \"{ep}\" does not exist in this network namespace: add it \
                 with \"ip graft add {ep} type {fam} addr ADDR port PORT\"",
                call.name()
            ),
        ),
        Reason::OptionRefused => {
            let label = graft_core::sockopt::lookup(r.opt_level, r.opt_name)
                .map(|o| o.label)
                .unwrap_or("(unknown)");
            (
                libc::EPERM,
                format!(
                    "{head}: option {label} refused by graftd: do not set it on a socket graft \
                     maps, or leave this address out of the graft rules"
                ),
            )
        }
        Reason::FamilyMismatch => {
            let sock = if family == libc::AF_INET6 {
                "an AF_INET6"
            } else {
                "an AF_INET"
            };
            (
                libc::EAFNOSUPPORT,
                format!(
                    "{head}: the endpoint's address family does not fit {sock} socket: map \
                     this address to an endpoint of the same family"
                ),
            )
        }
        Reason::Policy => (
            errno,
            format!(
                "{head}: refused by the endpoint's policy ({errstr}): change the endpoint's \
                 allow/deny clauses"
            ),
        ),
        Reason::Limit => (
            libc::ENOBUFS,
            format!(
                "{head}: endpoint \"{ep}\" already has as many live sockets as its limit \
                 allows: close some, or re-add it with a higher \"limit N\""
            ),
        ),
        // Only a dual-stack request gets it; graftd's own requests are not.
        Reason::NoDualStack => (
            errno,
            format!("{head}: graftd refused a dual-stack listener: check graftd's log"),
        ),
        Reason::Malformed => (
            libc::EPROTO,
            format!("{head}: graftd rejected the request as malformed: check graftd's log"),
        ),
        Reason::SocketFailed | Reason::None => (
            errno,
            format!("{head}: graftd could not make the host socket ({errstr}): check graftd's log"),
        ),
    }
}
