//! Answering one decoded request from the caller's namespace table: the
//! rules blob, an endpoint's address, one socket, a batch of them, or a
//! dual-stack listener. Refusals are logged on a budget.

use std::io;
use std::net::SocketAddrV6;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

#[cfg(test)]
use graft_core::proto::broker::BATCH_FIRST;
use graft_core::proto::broker::{Op, Reason, Reply, Request, BATCH_MAX};
use graft_core::sockopt;
use graft_core::{EndpointAddr, NetnsId};

use super::decode;
use crate::factory;
use crate::plan::{configured_sockaddr, plan, port_at_connect, Refusal};
use crate::state::{Endpoint, Target};
use crate::Ctx;

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

    /// The level for the next refusal line.
    fn level(&mut self) -> log::Level {
        if self.take() {
            log::Level::Info
        } else {
            log::Level::Debug
        }
    }

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

/// Answers one record from a client of namespace `ns`'s broker, as the
/// first request of a connection.
#[cfg(test)]
pub fn handle(
    ctx: &Ctx,
    ns: NetnsId,
    rec: &[u8],
    log_budget: &mut LogBudget,
) -> (Reply, Vec<OwnedFd>) {
    handle_sized(ctx, ns, rec, log_budget, Batch::FIRST)
}

/// Batches a broker connection has had in a row, each within
/// [`CHURN_WINDOW`] of the one before, before the next one marks its
/// sockets never to join the splice: 8 + 16 + 32 sockets that quickly, and
/// the process is opening connection after connection (each socket's
/// sockmap entry would cost it more than the few sends it carries;
/// `bench/profile-g2g-close`).
pub const CHURN_AFTER_BATCHES: u32 = 3;

/// A batch asked for longer than this after the one before starts the
/// count again: a process that reconnects now and then (a driver, a health
/// check) keeps its connections spliced, however many it makes over its
/// life.
pub const CHURN_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// What a `SocketBatch` on a broker connection gets.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    /// Most sockets.
    pub size: usize,
    /// The connection has had [`CHURN_AFTER_BATCHES`] batches: its sockets
    /// stay off the splice.
    pub churning: bool,
    /// For a trapped call of a program served in seccomp mode: its reads
    /// are not the preload library's, so the socket never joins the splice
    /// (marked so as it is handed out), and nobody reads the reply's
    /// address.
    pub seccomp: bool,
}

impl Batch {
    /// One socket for a program served in seccomp mode.
    pub const SECCOMP: Batch = Batch {
        size: 1,
        churning: false,
        seccomp: true,
    };

    /// The first batch of a connection.
    #[cfg(test)]
    pub const FIRST: Batch = Batch {
        size: graft_core::proto::broker::BATCH_FIRST,
        churning: false,
        seccomp: false,
    };

    /// The batch after `served` quick batches in a row (see
    /// [`CHURN_WINDOW`]), the last of size `size`.
    pub fn after(served: u32, size: usize) -> Batch {
        Batch {
            size,
            churning: served >= CHURN_AFTER_BATCHES,
            seccomp: false,
        }
    }

    /// Whether the sockets answering `op` never join the splice.
    fn no_join(&self, op: Op) -> bool {
        (self.churning && op == Op::SocketBatch) || self.seccomp
    }
}

/// Answers one record; a `SocketBatch` gets up to `batch.size` sockets.
pub fn handle_sized(
    ctx: &Ctx,
    ns: NetnsId,
    rec: &[u8],
    log_budget: &mut LogBudget,
    batch: Batch,
) -> (Reply, Vec<OwnedFd>) {
    let Some(req) = decode::request(ns, rec) else {
        return (decode::malformed(rec), Vec::new());
    };
    if req.op == Op::Rules {
        return rules(ctx, ns);
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
        Op::Socket | Op::SocketBatch | Op::Rules => sockets(ctx, ns, &ep, &req, batch, log_budget),
    }
}

/// The caller's namespace rules, as a sealed memfd.
fn rules(ctx: &Ctx, ns: NetnsId) -> (Reply, Vec<OwnedFd>) {
    let rules = ctx.state().rules(ns);
    match crate::rules_fd::sealed(&rules.to_blob()) {
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
    }
}

/// One socket, or for `SocketBatch` up to `batch` of them, each counted;
/// when none can be made, the first refusal.
fn sockets(
    ctx: &Ctx,
    ns: NetnsId,
    ep: &Endpoint,
    req: &Request,
    batch: Batch,
    log_budget: &mut LogBudget,
) -> (Reply, Vec<OwnedFd>) {
    // An egress socket of a unix endpoint is handed out connected:
    // a batch would open connections nobody uses yet.
    let unix = matches!(ep.spec.addr, EndpointAddr::Unix { .. });
    let mut want = if req.op == Op::SocketBatch && !unix {
        batch.size.clamp(1, BATCH_MAX)
    } else {
        1
    };
    // A batch made on this thread is marked as the kernel makes it (one
    // map update per batch instead of two system calls per socket); the
    // request carries no option (plan refuses the refused class anyway).
    let armed = if want > 1 && matches!(ep.target, Target::Own) && req.nopts == 0 {
        match ctx
            .hooks
            .arm_marks(&ep.hook_ref(), want, batch.no_join(req.op))
        {
            Some(Ok(a)) => {
                want = a.count;
                Some(a)
            }
            Some(Err(e)) => {
                let r = hook_refusal(Some(e));
                return refused(ns, ep, req, r, log_budget);
            }
            None => None,
        }
    } else {
        None
    };
    let mut made: Vec<factory::Made> = Vec::with_capacity(want);
    let mut failed = None;
    for _ in 0..want {
        match make_for(ctx, ep, req, made.is_empty() && !batch.seccomp) {
            Ok(m) => made.push(m),
            Err(r) => {
                failed = Some(r);
                break;
            }
        }
    }
    let fds: Vec<_> = made.iter().map(|m| m.fd.as_fd()).collect();
    let (ok, why) = match armed {
        Some(a) => ctx.hooks.settle_marks(a, &fds, &ep.hook_ref()),
        None => ctx
            .hooks
            .sockets_handed_out(&fds, &ep.hook_ref(), batch.no_join(req.op)),
    };
    drop(fds);
    if ok < made.len() {
        // The rest are closed unused: refused before anybody saw them.
        made.truncate(ok);
        failed = Some(hook_refusal(why));
    }
    for _ in &made {
        ep.count(true);
    }
    if let Some(first) = made.first() {
        log_handed_out(ns, ep, req, made.len(), failed);
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
    refused(ns, ep, req, r, log_budget)
}

/// The debug line for sockets handed out (`failed`: why a batch stopped
/// short).
fn log_handed_out(
    ns: NetnsId,
    ep: &Endpoint,
    req: &Request,
    count: usize,
    failed: Option<Refusal>,
) {
    if req.op == Op::SocketBatch {
        // Tests count these lines to tell batches from single requests.
        log::debug!(
            "{ns} endpoint {}: handed out {} {} sockets (SocketBatch){}",
            ep.spec.name,
            count,
            describe(req),
            failed
                .map(|r| format!(", then: {}", io::Error::from_raw_os_error(r.errno)))
                .unwrap_or_default()
        );
    } else {
        log::debug!(
            "{ns} endpoint {}: handed out a {} socket",
            ep.spec.name,
            describe(req)
        );
    }
}

/// A socket request refused: counted, logged on the budget, answered.
fn refused(
    ns: NetnsId,
    ep: &Endpoint,
    req: &Request,
    r: Refusal,
    log_budget: &mut LogBudget,
) -> (Reply, Vec<OwnedFd>) {
    ep.count(false);
    let opt = r
        .opt
        .map(|(l, n)| format!(" (option level {l} name {n}{})", label(l, n)))
        .unwrap_or_default();
    log::log!(
        log_budget.level(),
        "{ns} endpoint {}: refused a {} socket: {}{opt}: {}",
        ep.spec.name,
        describe(req),
        r.reason.describe(),
        io::Error::from_raw_os_error(r.errno)
    );
    (r.reply(req.op), Vec::new())
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
        log::log!(
            lb.level(),
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
        .steer_v6(made.fd.as_fd(), SocketAddrV6::new(*a6, port, 0, 0))
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

/// One socket for `ep`, accepted by the hooks.
fn socket_for(
    ctx: &Ctx,
    ep: &Endpoint,
    req: &Request,
    want_addr: bool,
) -> Result<factory::Made, Refusal> {
    let made = make_for(ctx, ep, req, want_addr)?;
    match ctx
        .hooks
        .sockets_handed_out(&[made.fd.as_fd()], &ep.hook_ref(), false)
    {
        (1, _) => Ok(made),
        (_, why) => Err(hook_refusal(why)),
    }
}

/// Why the hooks refused a socket, as the broker answers it.
fn hook_refusal(why: Option<io::Error>) -> Refusal {
    match why.and_then(|e| e.raw_os_error()) {
        Some(libc::ENOBUFS) => Refusal::new(libc::ENOBUFS, Reason::Limit),
        errno => Refusal::new(errno.unwrap_or(libc::EPERM), Reason::Policy),
    }
}

/// One socket for `ep`, made and bound as the request asks (not yet
/// accepted by the hooks).
fn make_for(
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
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::proto::broker::{Purpose, REQUEST_LEN};
    use graft_core::EndpointName;

    use crate::plan::tests::{int, req};
    use crate::sys;

    /// Hooks that take the first `.0` sockets and refuse the rest with
    /// errno `.1`.
    struct Takes(usize, i32);
    impl crate::ebpf_hooks::Hooks for Takes {
        fn sockets_handed_out(
            &self,
            socks: &[std::os::fd::BorrowedFd<'_>],
            _ep: &crate::ebpf_hooks::EndpointRef<'_>,
            _no_join: bool,
        ) -> (usize, Option<io::Error>) {
            let n = socks.len().min(self.0);
            let why = (n < socks.len()).then(|| io::Error::from_raw_os_error(self.1));
            (n, why)
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

    fn egress_batch() -> Request {
        let mut b = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        b.op = Op::SocketBatch;
        b.purpose = Purpose::Egress;
        b
    }

    /// Endpoint `ep`'s (sockets handed out, requests refused).
    fn handed_and_refused(ctx: &Ctx, ns: NetnsId) -> (u64, u64) {
        let ep = ctx
            .state()
            .lookup(ns, &EndpointName::new("ep").unwrap())
            .unwrap();
        (ep.stats().sockets, ep.stats().refused)
    }

    fn bytes(r: &Request) -> Vec<u8> {
        let mut b = [0u8; REQUEST_LEN];
        r.encode(&mut b);
        b.to_vec()
    }

    /// A first request for an AF_INET stream ingress socket.
    fn ingress_stream(ctx: &Ctx, ns: NetnsId, lb: &mut LogBudget) -> (Reply, Vec<OwnedFd>) {
        handle(
            ctx,
            ns,
            &bytes(&req(libc::AF_INET, libc::SOCK_STREAM, 0)),
            lb,
        )
    }

    #[test]
    fn handle_serves_only_the_namespace_table() {
        let (ctx, ns) = ctx_with(Box::new(crate::ebpf_hooks::NoHooks));
        let mut lb = LogBudget::default();
        let (r, fd) = ingress_stream(&ctx, ns, &mut lb);
        assert_eq!((r.errno, fd.len()), (0, 1));
        let other = NetnsId { dev: 4, ino: 78 };
        let (r, fd) = ingress_stream(&ctx, other, &mut lb);
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
        let (ctx, ns) = ctx_with(Box::new(Takes(0, libc::EACCES)));
        let mut lb = LogBudget::default();
        let (r, fd) = ingress_stream(&ctx, ns, &mut lb);
        assert_eq!(
            (r.errno, r.reason, fd.is_empty()),
            (libc::EACCES, Reason::Policy, true)
        );
        let b = egress_batch();
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
    fn a_batch_cut_short_by_a_limit_hands_out_what_the_hooks_took() {
        let (ctx, ns) = ctx_with(Box::new(Takes(3, libc::ENOBUFS)));
        let mut lb = LogBudget::default();
        let b = egress_batch();
        let (r, fds) = handle(&ctx, ns, &bytes(&b), &mut lb);
        assert_eq!((r.op, r.errno, fds.len()), (Op::SocketBatch, 0, 3));
        assert_eq!(handed_and_refused(&ctx, ns), (3, 0));
        // None left: the limit's errno and reason, one refusal.
        let (ctx, ns) = ctx_with(Box::new(Takes(0, libc::ENOBUFS)));
        let (r, fds) = handle(&ctx, ns, &bytes(&b), &mut lb);
        assert_eq!(
            (r.errno, r.reason, fds.len()),
            (libc::ENOBUFS, Reason::Limit, 0)
        );
        assert_eq!(handed_and_refused(&ctx, ns), (0, 1));
    }

    #[test]
    fn a_batch_is_eight_bound_sockets_each_counted() {
        let (ctx, ns) = ctx_with(Box::new(crate::ebpf_hooks::NoHooks));
        let mut lb = LogBudget::default();
        let b = egress_batch();
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
}
