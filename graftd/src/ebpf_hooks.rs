//! Where graft-ebpf plugs into graftd.
//!
//! graftd calls these hooks at the points the kernel-side companion needs to
//! know about; every method has a no-op default. [`load`] returns graft-ebpf's
//! companion, or [`WithoutEbpf`] when it is turned off (`--no-ebpf`) or cannot
//! load (no cgroup v2, BTF or privileges; logged once). Contract:
//!
//! * Hooks run on graftd's threads (control thread, broker thread) and must
//!   return quickly; they never block on I/O of a client.
//! * [`Hooks::sockets_handed_out`] runs on every socket before it is sent;
//!   returning an error refuses the request (the client gets that errno with
//!   `Reason::Policy`), so a policy that cannot be recorded fails closed. A
//!   batch made on the broker thread may instead be marked as it is made:
//!   [`Hooks::arm_marks`] before, [`Hooks::settle_marks`] (same contract as
//!   `sockets_handed_out`) after.
//! * [`Hooks::merge_stats`] fills the optional counters of `Stats`; graftd's
//!   own counters (`sockets`, `refused`) are already set.
//!
//! Call sites: `main.rs` (`load`, then `daemon_started`, before any thread
//! starts serving; `endpoints_restored` after the saved tables are loaded), `control.rs` (`endpoint_added`, `endpoint_removed`,
//! `merge_stats` for `show`), `gc.rs` (`endpoint_removed` for every endpoint
//! of a forgotten namespace), `broker/handle.rs` (`sockets_handed_out`, on the broker
//! thread, after bind and before the reply is sent), `daemon_stopping` from
//! `main.rs` on the way out.

use std::io;
use std::net::SocketAddrV6;
use std::os::fd::BorrowedFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use graft_core::endpoint::EndpointAddr;
use graft_core::proto::control::Stats;
use graft_core::rules::PolicyRule;
use graft_core::{EndpointName, NetnsId};

/// What graftd knows about itself when it starts.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// Splice grafted pairs (`graftd --no-splice` was not given).
    pub splice: bool,
    /// `graftd --no-ebpf` was not given: try to load the companion.
    pub ebpf: bool,
    /// graftd's own network namespace (the default target).
    pub own_netns: NetnsId,
    /// Where the companion is pinned (`--pin-dir`).
    pub pin_dir: std::path::PathBuf,
    /// Its cgroup (`--cgroup`).
    pub cgroup: String,
}

/// An endpoint, as the hooks see it.
#[derive(Debug, Clone, Copy)]
pub struct EndpointRef<'a> {
    /// Unique for the daemon's lifetime; a re-added name gets a new id.
    pub id: u64,
    pub name: &'a EndpointName,
    /// The namespace whose table holds the endpoint.
    pub netns: NetnsId,
    /// The namespace its sockets are made in.
    pub target: NetnsId,
    pub addr: &'a EndpointAddr,
    /// Egress policy clauses (empty: allow all).
    pub policy: &'a [PolicyRule],
    /// Most live sockets (the endpoint's own limit or graftd's default).
    pub limit: Option<u32>,
    /// Whether the endpoint has a `limit` of its own.
    pub own_limit: bool,
}

/// How many sockets, from the first, may be handed out, and why not more.
pub type Handed = (usize, Option<io::Error>);

/// What [`Hooks::arm_marks`] says: not armed, refused, or armed.
pub type Arming = Option<io::Result<Armed>>;

/// Marking at creation, armed by [`Hooks::arm_marks`].
pub struct Armed {
    /// How many sockets may be made.
    pub count: usize,
    token: Box<dyn std::any::Any + Send>,
}

/// The hook points. See the module documentation for the contract.
pub trait Hooks: Send + Sync {
    /// Once, after start-up (this is where cgroup placement and program
    /// loading happen) and before the first request is served.
    fn daemon_started(&self, _info: &DaemonInfo) {}

    /// The saved tables were restored at start (after `endpoint_added` for
    /// each): `live` is every endpoint graftd now has; state kept for others
    /// (by a pinned companion) goes.
    fn endpoints_restored(&self, _live: &[(NetnsId, EndpointName)]) {}

    /// An endpoint was added.
    fn endpoint_added(&self, _ep: &EndpointRef<'_>) {}

    /// An endpoint was removed (by `del`, or because its namespace was
    /// forgotten).
    fn endpoint_removed(&self, _ep: &EndpointRef<'_>) {}

    /// `listener`, made for an IPv4 endpoint as a dual-stack AF_INET6
    /// socket in graftd's own namespace and already listening, should also
    /// answer IPv6 TCP connections to `to` (the IPv6 endpoint of a
    /// `[::]` bind). An error refuses the dual-stack request (the library
    /// then grafts the socket onto the IPv6 endpoint alone).
    fn steer_v6(&self, _listener: BorrowedFd<'_>, _to: SocketAddrV6) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Sockets were made (and bound, or left for `connect()` to bind) for
    /// `ep` and are about to be handed out, for listening or connecting
    /// alike; with `no_join` they never join the splice (a client opening
    /// connection after connection, a program served in seccomp mode, whose
    /// reads are not the library's: a blocking read of a spliced socket
    /// could fail with EAGAIN). Returns how many of them, from the first,
    /// may go, and why the next may not.
    fn sockets_handed_out(&self, s: &[BorrowedFd<'_>], _ep: &EndpointRef<'_>, _nj: bool) -> Handed {
        (s.len(), None)
    }

    /// Up to `want` sockets for `ep` are about to be made on the calling
    /// thread, in graftd's own namespace, with no option of the refused
    /// class: the companion may mark them as the kernel makes them, which is
    /// cheaper than `sockets_handed_out` afterwards. `None`: not armed, use
    /// `sockets_handed_out`; `Some(Err)`: make none (refused as
    /// `sockets_handed_out` would); `Some(Ok(a))`: make at most `a.count`,
    /// then `settle_marks` before this thread makes any other socket.
    /// `no_join`: they never join the splice (as for `sockets_handed_out`).
    fn arm_marks(&self, _ep: &EndpointRef<'_>, _n: usize, _no_join: bool) -> Arming {
        None
    }

    /// The sockets made since `arm_marks`: as `sockets_handed_out`.
    fn settle_marks(&self, _a: Armed, _s: &[BorrowedFd<'_>], _ep: &EndpointRef<'_>) -> Handed {
        // Only an implementation that arms may settle: refuse (fail closed).
        (0, Some(io::Error::from_raw_os_error(libc::EPERM)))
    }

    /// Whether every socket marked in `sockets_handed_out` refuses a later
    /// `bind()` from whoever holds it (graft-ebpf's bind guard). Only then
    /// may an egress socket leave its port to `connect()`.
    fn bind_guarded(&self) -> bool {
        false
    }

    /// `show` asks for the counters of `ep`: add the kernel-side ones.
    fn merge_stats(&self, _ep: &EndpointRef<'_>, _stats: &mut Stats) {}

    /// A program about to run in seccomp mode is in process `pid`'s
    /// cgroup: from now on, record which carried options its sockets are
    /// set, for as long as the returned guard lives. `None`: not recorded.
    fn watch_options(&self, _pid: u32) -> Option<Box<dyn Send>> {
        None
    }

    /// The program's socket `sock` as recorded under a watch: what it was
    /// made as, in which namespace, and which of
    /// `graft_core::sockopt::SNAPSHOT`'s options were set on it; `None`:
    /// unknown, so the socket itself must be asked (every option read).
    fn app_socket(&self, _sock: BorrowedFd<'_>) -> Option<graft_ebpf::AppSocket> {
        None
    }

    /// graftd is about to exit: undo what `load` set up.
    fn daemon_stopping(&self) {}
}

/// Hooks that do nothing (unit tests of graftd).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct NoHooks;

#[cfg(test)]
impl Hooks for NoHooks {}

/// The hooks graftd runs with: graft-ebpf's companion, or, when it is
/// turned off or cannot load, [`WithoutEbpf`] after one log line saying why.
pub fn load(info: &DaemonInfo) -> Box<dyn Hooks> {
    let without =
        "running without in-kernel egress policy, kernel counters, live socket limits and splicing";
    if !info.ebpf {
        log::info!("eBPF companion disabled (--no-ebpf): {without}");
        return Box::new(WithoutEbpf);
    }
    let opts = graft_ebpf::Options {
        splice: info.splice,
        cgroup_name: Some(info.cgroup.clone()),
        pin_dir: Some(info.pin_dir.clone()),
    };
    match graft_ebpf::Companion::start(&opts) {
        Ok(c) => {
            log::info!(
                "eBPF companion attached to cgroup {}, pinned in {} (egress policy, counters, splicing {})",
                c.cgroup().display(),
                info.pin_dir.display(),
                if c.splice() { "on" } else { "off" }
            );
            if let Some(why) = c.steer_problem() {
                log::warn!(
                    "dual-stack listeners unavailable ({why}): a [::] bind answers on its IPv6 endpoint only"
                );
            }
            Box::new(Ebpf {
                guarded: c.bind_guarded(),
                companion: Mutex::new(Some(c)),
                splice_checked: Mutex::new(None),
            })
        }
        Err(e) => {
            log::warn!("eBPF companion unavailable ({e}): {without}");
            Box::new(WithoutEbpf)
        }
    }
}

/// graftd when the companion is off: egress policies cannot be enforced, so
/// the sockets of an endpoint that has one are refused (fail closed); every
/// other endpoint works as usual.
#[derive(Debug, Default)]
pub struct WithoutEbpf;

impl Hooks for WithoutEbpf {
    fn endpoint_added(&self, ep: &EndpointRef<'_>) {
        if !ep.policy.is_empty() {
            log::warn!(
                "endpoint {} has an egress policy but the eBPF companion is not loaded: its sockets will be refused",
                ep.name
            );
        }
        if ep.own_limit {
            log::warn!(
                "endpoint {} has a limit but the eBPF companion (which counts closed sockets) is not loaded: its sockets will be refused",
                ep.name
            );
        }
    }

    fn sockets_handed_out(&self, s: &[BorrowedFd<'_>], ep: &EndpointRef<'_>, _nj: bool) -> Handed {
        let errno = if !ep.policy.is_empty() {
            libc::EPERM
        } else if ep.own_limit {
            // Closes cannot be counted: fail closed.
            libc::ENOBUFS
        } else {
            return (s.len(), None);
        };
        (0, Some(io::Error::from_raw_os_error(errno)))
    }
}

/// graft-ebpf's companion behind graftd's hooks.
struct Ebpf {
    /// The companion's bind guard is attached (fixed at start).
    guarded: bool,
    /// `None` once stopping.
    companion: Mutex<Option<graft_ebpf::Companion>>,
    /// When sockets handed out last asked for a splice problem.
    splice_checked: Mutex<Option<Instant>>,
}

impl Ebpf {
    /// The companion's maps are only ever changed under this lock; a panic
    /// while holding it leaves them consistent, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Option<graft_ebpf::Companion>> {
        self.companion.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs new splice failures, asked (one bpf() lookup) at most once a
    /// second by the sockets handed out: a trapped connect in seccomp mode
    /// or a single socket would otherwise pay it each time. `ip graft show`
    /// asks every time.
    fn report_splice_problem(&self, c: &mut graft_ebpf::Companion) {
        if !c.splice() {
            return;
        }
        let mut last = self
            .splice_checked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        if let Some(line) = c.splice_problem() {
            log::warn!("{line}");
        }
    }
}

fn key(ep: &EndpointRef<'_>) -> graft_ebpf::EndpointKey {
    graft_ebpf::EndpointKey {
        netns: ep.netns,
        name: *ep.name,
    }
}

/// The errno a socket refused by the companion fails with (logged).
fn refusal(e: graft_ebpf::Error, ep: &EndpointRef<'_>) -> io::Error {
    match e {
        graft_ebpf::Error::LimitReached { .. } => {
            log::debug!("refusing a socket: {e}");
            io::Error::from_raw_os_error(libc::ENOBUFS)
        }
        e => {
            log::error!("refusing a socket of endpoint {}: {e}", ep.name);
            io::Error::from_raw_os_error(libc::EPERM)
        }
    }
}

fn is_inet(ep: &EndpointRef<'_>) -> bool {
    !matches!(ep.addr, EndpointAddr::Unix { .. })
}

impl Hooks for Ebpf {
    fn endpoints_restored(&self, live: &[(NetnsId, EndpointName)]) {
        if let Some(c) = self.lock().as_mut() {
            let keep: Vec<graft_ebpf::EndpointKey> = live
                .iter()
                .map(|(netns, name)| graft_ebpf::EndpointKey {
                    netns: *netns,
                    name: *name,
                })
                .collect();
            c.retain_endpoints(&keep);
        }
    }

    fn endpoint_added(&self, ep: &EndpointRef<'_>) {
        if let Some(c) = self.lock().as_mut() {
            if let Err(e) = c.add_endpoint(key(ep), ep.policy) {
                // Its sockets are refused in sockets_handed_out (fail closed).
                log::error!("{e}");
            }
        }
    }

    fn endpoint_removed(&self, ep: &EndpointRef<'_>) {
        if let Some(c) = self.lock().as_mut() {
            c.remove_endpoint(&key(ep));
        }
    }

    fn sockets_handed_out(&self, s: &[BorrowedFd<'_>], ep: &EndpointRef<'_>, nj: bool) -> Handed {
        let mut g = self.lock();
        let Some(c) = g.as_mut() else {
            return (0, Some(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        };
        self.report_splice_problem(c);
        let (n, why) = c.register_sockets_with_policy(s, &key(ep), ep.policy, ep.limit, nj);
        (n, why.map(|e| refusal(e, ep)))
    }

    fn arm_marks(&self, ep: &EndpointRef<'_>, want: usize, no_join: bool) -> Arming {
        let mut g = self.lock();
        let Some(c) = g.as_mut() else {
            return Some(Err(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        };
        if !is_inet(ep) {
            return None;
        }
        Some(
            c.arm_marks(&key(ep), ep.policy, want, ep.limit, no_join)
                .map(|a| Armed {
                    count: a.count(),
                    token: Box::new(a),
                })
                .map_err(|e| refusal(e, ep)),
        )
    }

    fn settle_marks(&self, armed: Armed, socks: &[BorrowedFd<'_>], ep: &EndpointRef<'_>) -> Handed {
        let mut g = self.lock();
        let (Some(c), Ok(a)) = (g.as_mut(), armed.token.downcast::<graft_ebpf::Armed>()) else {
            return (0, Some(io::Error::from_raw_os_error(libc::ESHUTDOWN)));
        };
        self.report_splice_problem(c);
        let (n, why) = c.settle_marks(*a, socks);
        (n, why.map(|e| refusal(e, ep)))
    }

    fn bind_guarded(&self) -> bool {
        // sockets_handed_out refuses every socket once the companion is gone,
        // so a socket bound without its port is never handed out unguarded.
        self.guarded
    }

    fn watch_options(&self, pid: u32) -> Option<Box<dyn Send>> {
        let g = self.lock();
        match g.as_ref()?.watch_options(pid) {
            Ok(w) => w.map(|w| Box::new(w) as Box<dyn Send>),
            Err(e) => {
                log::debug!(
                    "eBPF companion: cannot record the options of pid {pid}'s sockets: {e}"
                );
                None
            }
        }
    }

    fn app_socket(&self, sock: BorrowedFd<'_>) -> Option<graft_ebpf::AppSocket> {
        self.lock().as_ref()?.app_socket(sock)
    }

    fn steer_v6(&self, listener: BorrowedFd<'_>, to: SocketAddrV6) -> io::Result<()> {
        let mut g = self.lock();
        let Some(c) = g.as_mut() else {
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        };
        c.steer_v6(listener, *to.ip(), to.port(), libc::IPPROTO_TCP)
            .map_err(|e| {
                log::warn!("{e}");
                io::Error::from_raw_os_error(libc::EOPNOTSUPP)
            })
    }

    fn merge_stats(&self, ep: &EndpointRef<'_>, stats: &mut Stats) {
        if !is_inet(ep) {
            return;
        }
        let mut g = self.lock();
        let Some(c) = g.as_mut() else {
            return;
        };
        if let Some(line) = c.splice_problem() {
            log::warn!("{line}");
        }
        if let Some(n) = c.counters(&key(ep)) {
            stats.policy_denied = Some(n.policy_denied);
            stats.active_established = Some(n.active_established);
            stats.passive_established = Some(n.passive_established);
            stats.bytes_sent = Some(n.bytes_sent);
            stats.bytes_received = Some(n.bytes_received);
            stats.spliced_bytes = c.splice().then_some(n.spliced_bytes);
        }
        stats.live = c.live(&key(ep));
    }

    fn daemon_stopping(&self) {
        // Closes graftd's handles; the pinned links and maps stay, so the
        // policy stays armed until the next graftd adopts them (or
        // `graftd --remove`).
        drop(self.lock().take());
    }
}
