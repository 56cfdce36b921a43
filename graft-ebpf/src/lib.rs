//! `graft-ebpf`: graft's kernel-side companion.
//!
//! Small eBPF programs, written in C (`src/bpf/graft.bpf.c`, compiled by
//! `build.rs` with clang and embedded here), that graftd loads with `aya` and
//! attaches to a cgroup v2 of its own. Every socket graftd hands out was
//! created by graftd, so it belongs to that cgroup for life, wherever the
//! program using it runs; connections accepted on a grafted listener inherit
//! the listener's cgroup. No other socket on the machine is seen (but for
//! the option record of seccomp-mode programs, below).
//!
//! How it works:
//! * graftd marks each socket it hands out with its endpoint id in a
//!   socket-local storage map ([`Companion::register_socket`]). The map is
//!   created with `BPF_F_CLONE`, so the kernel copies the mark onto every
//!   connection accepted from a marked listener, and frees it with the socket:
//!   no table to clean up. Unmarked sockets are never touched. A batch of
//!   egress sockets is marked as the kernel makes it instead
//!   ([`Companion::arm_marks`]: `cgroup/sock_create` marks the next N inet
//!   sockets of the graftd thread that armed it), one map update per batch
//!   instead of a map update and a `SO_COOKIE` read per socket (graftd's
//!   CPU per egress connection 15–18 % lower, `bench/ab-egress`); graftd
//!   checks that the sockets it made were marked before it hands any out.
//! * cgroup `connect4/6`, `sendmsg4/6` enforce the endpoint's `allow`/`deny`
//!   clauses with the semantics of [`graft_core::rules::policy_allows`]; a
//!   refused call fails with EPERM and counts in `policy_denied`.
//! * `sockops` counts connections established actively and passively, and the
//!   bytes of each connection when it closes; with splicing on, it puts an
//!   established grafted socket into a socket hash keyed by (netns cookie,
//!   family, local and remote address and port) when its peer is grafted
//!   too: a client when it connected to a grafted listener of this host
//!   (`graft_listeners`, kept at `listen()` and at the listener's close), an
//!   accepted socket when its client joined (the client's establishment
//!   comes first). A socket in the hash pays the sockmap detour on every
//!   send and receive even when nothing is redirected (measured: a grafted
//!   nginx's keep-alive clients on the host 0.92 → 0.81 × host, wrk as a
//!   grafted client 0.91 → 0.84, while every socket joined), so nothing
//!   else joins.
//! * `sk_msg`, attached to that hash, hands each send straight to the peer's
//!   receive queue when the peer is a grafted socket of this host too. A
//!   direction that ever went through TCP stays on TCP, so bytes are never
//!   reordered.
//! * `sk_lookup` (`graft_sk_lookup`), attached to graftd's own network
//!   namespace rather than the cgroup (a netns link: sk_lookup cannot cross
//!   namespaces): IPv6 connections to an address and port held in
//!   `graft_steer` go to the dual-stack listener stored there
//!   ([`Companion::steer_v6`]); a listener bound to `[::ffff:A4]:P4` takes
//!   IPv4 natively, so one socket answers on an IPv4 and an IPv6 endpoint.
//!   Its load or attach failing only turns that off
//!   ([`Companion::steer_problem`]).
//!
//! * `cgroup/sock_release` counts closes of the sockets graftd handed out
//!   (matched by socket cookie, so accepted children do not count): with
//!   graftd's count of sockets handed out this gives each endpoint's live
//!   sockets, which [`Companion::register_sockets`] holds to a limit.
//! * For a program served in seccomp mode that runs in a cgroup of its own
//!   (a container's, a unit's), `graft_app_sock_create` and
//!   `graft_app_setsockopt` are attached to *that* cgroup for as long as
//!   graftd serves it ([`Companion::watch_options`], links not pinned):
//!   every inet socket made there gets a record of its family, type,
//!   protocol and namespace and of which carried options
//!   (`graft_core::sockopt::SNAPSHOT`) it was set, so at a trapped connect
//!   graftd asks the socket for none of the first and only those few of
//!   the options ([`Companion::app_socket`]). The only programs that see
//!   sockets graftd did not make; they change nothing.
//!
//! Outliving graftd ([`Options::pin_dir`]): the maps in `PINNED_MAPS` are
//! pinned as `DIR/maps/NAME` and every cgroup program is attached by a
//! bpf_link pinned as `DIR/links/NAME`, to a cgroup that is left in place.
//! The programs then keep guarding every grafted socket while no graftd runs.
//! The next [`Companion::start`] reuses the pinned maps (socket marks,
//! policies, counters, endpoint ids) and swaps its freshly loaded programs
//! into the pinned links with `BPF_LINK_UPDATE` (atomic: no hook is ever
//! empty or doubled). [`remove_pinned`] takes it all away. Adding a program:
//! one line in `CGROUP_PROGRAMS`; a map whose contents must survive a
//! restart: one line in `PINNED_MAPS`.
//!
//! Without cgroup v2, BTF or the privileges, [`Companion::start`] fails with
//! an [`Error`] naming what failed; graftd logs it once and runs without.
//! When no cgroup2 mount is visible (graftd under `ip netns exec`, which
//! remounts /sys; v1-only hosts), the loader mounts the v2 hierarchy on a
//! private directory for its lifetime.
//!
//! Decisions and limits:
//! * Endpoint removal removes its policy: sockets of that endpoint still open
//!   are refused further `connect()`/`sendto()` (fail closed) and no longer
//!   counted.
//! * A policy holds at most [`maps::MAX_RULES`] clauses (the program walks
//!   them with `bpf_loop`); a longer one makes the endpoint's sockets
//!   refused.
//! * Byte counters are payload bytes: TCP's own counts (SYN and FIN removed)
//!   when a connection closes, plus, for spliced connections, each redirected
//!   message as it is sent.
//! * Splicing is on by default (`graftd --no-splice` turns it off). It only joins two
//!   grafted sockets (a host socket cannot opt in: it is not in graftd's
//!   cgroup, and marking arbitrary host sockets would reach beyond graft's
//!   own). Spliced sockets take the kernel's sockmap receive path
//!   (`tcp_bpf_recvmsg`), which differs from plain TCP in one way an
//!   application can notice: a blocking `recv()` may fail with EAGAIN after a
//!   wake-up that brought no data (seen on 6.18: a signal, the ACK of the
//!   socket's own FIN, another thread's send freeing memory;
//!   `tcp_msg_wait_data` returns after one wake-up, and `tcp_bpf_recvmsg`
//!   turns "no data" into EAGAIN).
//!   Event-driven programs (poll/epoll, non-blocking sockets, CPython with a
//!   socket timeout) are unaffected (poll, FIONREAD and MSG_PEEK see
//!   redirected bytes on 6.18); for blocking readers libgraft-convert
//!   repeats such a receive (read, readv, recv, recvfrom, recvmsg, recvmmsg and
//!   glibc's fortified `__read_chk`/`__recv_chk`/`__recvfrom_chk`), or fails
//!   it with EINTR when a handler without SA_RESTART is installed, and gives
//!   `fdopen`ed sockets (and an inherited socket's `stdin`) streams that read
//!   through it. A
//!   program graftd serves in seccomp mode reads with calls the library
//!   does not see: graftd registers its sockets marked `GRAFT_SK_NO_JOIN`
//!   ([`Companion::register_sockets_with_policy`] with `no_join`, or
//!   [`Companion::keep_off_splice`] for a socket marked already; an
//!   accepted socket inherits it from its listener), and they stay on TCP.
//!   A client opening connection after
//!   connection (its broker connection had three batches in a row, each
//!   within a second of the one before) gets sockets
//!   marked `GRAFT_SK_NO_JOIN` ([`Companion::arm_marks`]): each one's
//!   sockmap setup and deferred teardown (kernel workqueue) cost more than
//!   the few sends it carries (`bench/profile-g2g-close`).
//! * Reordering is impossible by construction: a socket enters the splice
//!   map at establishment (before any data, unless data rode in the SYN, in
//!   which case it never splices), and a direction that sent anything through
//!   TCP never switches to redirection. Redirection to a peer that went away
//!   falls back to TCP (never dropped).
//! * One owner per socket: if another sk_msg program already owns a socket
//!   (EBUSY), the connection is not spliced and [`Companion::splice_problem`]
//!   returns one line saying so.
//! * `cgroup/bind4`, `cgroup/bind6`: a marked socket refuses every `bind()`
//!   with EPERM (counted in `policy_denied`), except from the process that
//!   loaded the programs (graftd, which binds before it marks anyway); this
//!   is what makes
//!   it safe for graftd to bind egress sockets with `IP_BIND_ADDRESS_NO_PORT`
//!   (or not at all, for a wildcard endpoint) and let `connect()` pick the
//!   port as on the host, reusing TIME_WAIT ports and sharing ports between
//!   4-tuples. Runs by the socket's cgroup, like setsockopt.
//! * `cgroup/setsockopt` closes the hole the broker's option check leaves:
//!   graftd refuses the options of `graft_core::sockopt`'s `Class::Refuse`
//!   list (`SO_BINDTODEVICE`, `SO_BINDTOIFINDEX`, `SO_MARK`,
//!   `IP(V6)_TRANSPARENT`, `IP(V6)_FREEBIND`, `IP(V6)_UNICAST_IF`,
//!   `IP(V6)_MULTICAST_IF`, `IP_OPTIONS`, `IPV6_PKTINFO`, `IPV6_RTHDR`)
//!   in requests, but a process holding a grafted host socket could set them
//!   directly (a Docker container's root keeps `CAP_NET_RAW` in the initial
//!   user namespace, enough for `SO_BINDTODEVICE`). On a marked socket the
//!   program refuses them with EPERM, from any process, and counts them in
//!   `policy_denied`; every other option, and every option on unmarked
//!   sockets, goes to the kernel untouched. This works because the kernel
//!   runs the setsockopt hook of the *socket's* cgroup (`sk_cgrp_data`, set
//!   when graftd created it), not the caller's (checked by
//!   `tests/companion.rs`, which sets options from a process in another
//!   cgroup). `getsockopt` is not hooked: reading is harmless. Without the
//!   companion (`graftd --no-ebpf`, or a kernel that refused to load it) the
//!   guard is absent and only the broker's check remains.
//! * Known hole: the kernel runs the cgroup setsockopt hook only for native
//!   system calls (`do_sock_setsockopt` skips it when `in_compat_syscall()`),
//!   so a 32-bit x86 program (ia32 emulation, on by default) can still set
//!   these options on a grafted socket; checked by hand on 6.18 (SO_MARK
//!   refused from python3, applied from a static i386 binary on the same
//!   socket). Closing it needs a BPF LSM program (`socket_setsockopt`) or a
//!   seccomp filter in the container; neither is done here.

mod cgroup;
pub mod maps;
mod pin;

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, SkStorage, SockHash};
use aya::programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use graft_core::rules::PolicyRule;
use graft_core::{EndpointName, NetnsId};
use graft_seccomp::sockopt;

pub use cgroup::Placement;
pub use maps::{GraftCounters, GraftGlobal, GraftSk};
use pin::attach;

/// The compiled programs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/graft.bpf.o"));

/// The compiled eBPF object (ELF with BTF), for diagnostics and for tests
/// that need a second, independent instance of the programs.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// How a program is loaded (its aya type).
#[derive(Debug, Clone, Copy)]
enum Kind {
    SockAddr,
    SockOps,
    Sockopt,
    Sock,
}

/// Attached by [`Companion::watch_options`] to a seccomp-mode program's
/// cgroup, never to graftd's; as [`CGROUP_PROGRAMS`], not pinned.
const WATCH_PROGRAMS: &[(&str, Kind, u32)] = &[
    (
        "graft_app_sock_create",
        Kind::Sock,
        attach::CGROUP_INET_SOCK_CREATE,
    ),
    (
        "graft_app_setsockopt",
        Kind::Sockopt,
        attach::CGROUP_SETSOCKOPT,
    ),
];

/// Marking at creation armed for the calling thread
/// ([`Companion::arm_marks`]); settled by [`Companion::settle_marks`].
#[derive(Debug)]
#[must_use = "settle it, or the thread's next sockets are marked"]
pub struct Armed {
    tid: u64,
    key: EndpointKey,
    n: u32,
    limit: Option<u32>,
    no_join: bool,
}

impl Armed {
    /// How many sockets may be made.
    pub fn count(&self) -> usize {
        self.n as usize
    }
}

/// The mark's flags of a socket graftd hands out.
fn handed_flags(no_join: bool) -> u32 {
    if no_join {
        maps::SK_HANDED | maps::SK_NO_JOIN
    } else {
        maps::SK_HANDED
    }
}

/// The calling thread as `bpf_get_current_pid_tgid()` names it (ids of the
/// initial pid namespace; in another one the key matches nothing, and
/// [`Companion::settle_marks`] falls back to marking the ordinary way).
fn thread_key() -> u64 {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() } as u32;
    (u64::from(std::process::id()) << 32) | u64::from(tid)
}

/// An endpoint's count of sockets handed out and of their closes last read.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    handed: u64,
    released: u64,
}

/// A recording of a cgroup's socket options: detached when dropped.
#[derive(Debug)]
pub struct OptionWatch {
    _links: Vec<OwnedFd>,
}

/// A watched program's socket as the companion recorded it
/// ([`Companion::app_socket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppSocket {
    /// Bit i: `graft_core::sockopt::SNAPSHOT[i]` was set on it.
    pub options_set: u64,
    /// The netns cookie of the namespace it was made in.
    pub netns_cookie: u64,
    /// (family, type, protocol) as made; `None` when it may have changed
    /// since (`IPV6_ADDRFORM`): ask the socket.
    pub kind: Option<(libc::c_int, libc::c_int, libc::c_int)>,
}

/// The one list of programs attached to the companion's cgroup: name in
/// graft.bpf.c, aya type, hook (`enum bpf_attach_type`). Each becomes one
/// bpf_link, pinned as `PIN_DIR/links/NAME`.
const CGROUP_PROGRAMS: &[(&str, Kind, u32)] = &[
    (
        "graft_connect4",
        Kind::SockAddr,
        attach::CGROUP_INET4_CONNECT,
    ),
    (
        "graft_connect6",
        Kind::SockAddr,
        attach::CGROUP_INET6_CONNECT,
    ),
    (
        "graft_sendmsg4",
        Kind::SockAddr,
        attach::CGROUP_UDP4_SENDMSG,
    ),
    (
        "graft_sendmsg6",
        Kind::SockAddr,
        attach::CGROUP_UDP6_SENDMSG,
    ),
    ("graft_sockops", Kind::SockOps, attach::CGROUP_SOCK_OPS),
    ("graft_setsockopt", Kind::Sockopt, attach::CGROUP_SETSOCKOPT),
    // The bind guard: see `Companion::bind_guarded`.
    ("graft_bind4", Kind::SockAddr, attach::CGROUP_INET4_BIND),
    ("graft_bind6", Kind::SockAddr, attach::CGROUP_INET6_BIND),
    (
        "graft_sock_release",
        Kind::Sock,
        attach::CGROUP_INET_SOCK_RELEASE,
    ),
    // Marking at creation: see `Companion::arm_marks`.
    (
        "graft_sock_create",
        Kind::Sock,
        attach::CGROUP_INET_SOCK_CREATE,
    ),
];

/// Maps whose contents must survive graftd (pinned as `PIN_DIR/maps/NAME`):
/// socket marks, policies, counters, endpoint ids, splice tables. A map not
/// listed here is made afresh by every graftd.
const PINNED_MAPS: &[&str] = &[
    "graft_sk_map",
    "graft_policy_map",
    "graft_counters_map",
    "graft_socks",
    "graft_sock_ep",
    "graft_splice_owed_map",
    "graft_global_map",
    "graft_listeners",
    "graft_ep_ids",
    "graft_next_id",
    "graft_steer",
];

/// Why the companion could not start or an operation on it failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("our cgroup v2 path {path} is not visible under any cgroup2 mount")]
    CgroupNotVisible { path: String },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {detail}")]
    Bpf { op: String, detail: String },
    #[error("endpoint {name}: policy has {len} clauses, the kernel program checks at most {max}")]
    PolicyTooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("endpoint {name} has {live} live sockets, its limit")]
    LimitReached { name: String, live: u64 },
    #[error("endpoint {name} in {netns} is not registered with the eBPF companion")]
    UnknownEndpoint { name: String, netns: NetnsId },
}

/// Formats an error with its whole source chain (aya's top-level messages
/// alone rarely say what the kernel refused).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn bpf_err<E: std::error::Error>(op: impl Into<String>) -> impl FnOnce(E) -> Error {
    let op = op.into();
    move |e| Error::Bpf {
        op,
        detail: chain(&e),
    }
}

/// How to start the companion.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Splice local grafted↔grafted TCP connections (graftd's default;
    /// off with `graftd --no-splice`).
    pub splice: bool,
    /// The cgroup the programs are attached to and the process moves into:
    /// a name, made under the cgroup the process starts in, or an absolute
    /// path from the cgroup2 root; `graftd-PID` if unset.
    pub cgroup_name: Option<String>,
    /// Pin maps and links under this bpffs directory, so the programs stay
    /// armed after the process exits and the next one adopts them; `None`:
    /// everything goes with the process.
    pub pin_dir: Option<PathBuf>,
}

/// Counters of one endpoint, as the programs keep them.
pub type Counters = GraftCounters;

/// Identity of an endpoint: the namespace its table lives in and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub netns: NetnsId,
    pub name: EndpointName,
}

/// The loaded and attached programs. Dropping it detaches them, moves the
/// process back to its original cgroup and removes the one it made; when
/// pinned ([`Options::pin_dir`]) it only closes the process's handles and
/// everything stays attached.
pub struct Companion {
    // Field order is drop order: links (which detach when not pinned),
    // programs and maps go before the process leaves the cgroup they were
    // attached to.
    _links: Vec<OwnedFd>,
    ebpf: Ebpf,
    sk: SkStorage<MapData, GraftSk>,
    policies: HashMap<MapData, u32, maps::GraftPolicy>,
    counters: HashMap<MapData, u32, GraftCounters>,
    global: Array<MapData, GraftGlobal>,
    ids: HashMap<MapData, maps::GraftEpKey, maps::GraftEpVal>,
    next: Array<MapData, u64>,
    /// Per graftd thread: sockets to mark as they are made
    /// ([`Companion::arm_marks`]).
    mark_next: HashMap<MapData, u64, maps::GraftMark>,
    _socks: Option<SockHash<MapData, [u8; 56]>>,
    /// Options set on sockets of programs served in seccomp mode (see
    /// [`Companion::watch_options`]).
    app_opts: SkStorage<MapData, maps::GraftAppSock>,
    /// The dual-stack steering map, when `graft_sk_lookup` is attached to
    /// graftd's own namespace; else why not.
    steer: Result<SockHash<MapData, [u8; 24]>, String>,
    endpoints: StdHashMap<EndpointKey, u32>,
    /// Per endpoint id: what `graft_ep_ids` holds as handed out (only
    /// graftd writes it, under the caller's lock) and the last
    /// `released` count read, so registering a socket reads neither map.
    tallies: StdHashMap<u32, Tally>,
    next_id: u32,
    splice: bool,
    splice_errors_seen: u64,
    pinned: Option<PathBuf>,
    placement: Placement,
}

impl std::fmt::Debug for Companion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Companion")
            .field("cgroup", &self.placement.dir)
            .field("splice", &self.splice)
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or_else(|| Error::Bpf {
        op: format!("find map {name}"),
        detail: "missing from the object".into(),
    })?;
    T::try_from(m).map_err(bpf_err(format!("open map {name}")))
}

impl Companion {
    /// Loads the programs, moves the process into the companion's cgroup and
    /// attaches them there. With [`Options::pin_dir`], maps and links are
    /// pinned (or adopted from an earlier graftd, whose links get the new
    /// programs atomically) and stay armed after the process exits.
    pub fn start(opts: &Options) -> Result<Self, Error> {
        let splice = u32::from(opts.splice);
        let pins = match &opts.pin_dir {
            Some(dir) => Some(prepare_pin_dir(dir)?),
            None => None,
        };
        // The bind guard lets this process's own binds through (it binds
        // before it marks; tests playing graftd bind after).
        let binder = std::process::id();
        // Load before touching cgroups: a kernel without BTF or without the
        // privileges fails here with nothing to undo.
        // No CO-RE relocations in our programs: skip parsing the kernel BTF
        // (megabytes, seconds in a debug build); maps still carry their BTF.
        let mut loader = EbpfLoader::new();
        loader
            .btf(None)
            .override_global("splice_enabled", &splice, true)
            .override_global("binder_tgid", &binder, true);
        if let Some(p) = &pins {
            check_pinned_maps(&p.maps)?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, p.maps.join(name));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(bpf_err("load eBPF object"))?;
        for (name, kind, _) in CGROUP_PROGRAMS.iter().chain(WATCH_PROGRAMS) {
            load_program(&mut ebpf, name, *kind)?;
        }
        let mut bits: HashMap<MapData, u32, u32> = take(&mut ebpf, "graft_opt_bits")?;
        for (i, o) in graft_core::sockopt::SNAPSHOT.iter().enumerate().take(64) {
            let key = ((o.level as u32) << 16) | (o.name as u32 & 0xffff);
            bits.insert(key, i as u32, 0)
                .map_err(bpf_err("fill graft_opt_bits"))?;
        }
        let app_opts = take(&mut ebpf, "graft_app_opts")?;

        let socks = if opts.splice {
            let socks: SockHash<MapData, [u8; 56]> = take(&mut ebpf, "graft_socks")?;
            let msg: &mut SkMsg = prog(&mut ebpf, "graft_sk_msg")?;
            msg.load().map_err(bpf_err("load program graft_sk_msg"))?;
            msg.attach(socks.fd())
                .map_err(bpf_err("attach graft_sk_msg to the socket hash"))?;
            Some(socks)
        } else {
            None
        };
        let sk = take(&mut ebpf, "graft_sk_map")?;
        let policies = take(&mut ebpf, "graft_policy_map")?;
        let counters = take(&mut ebpf, "graft_counters_map")?;
        let global = take(&mut ebpf, "graft_global_map")?;
        let ids: HashMap<MapData, maps::GraftEpKey, maps::GraftEpVal> =
            take(&mut ebpf, "graft_ep_ids")?;
        let next: Array<MapData, u64> = take(&mut ebpf, "graft_next_id")?;
        let mark_next = take(&mut ebpf, "graft_mark_next")?;

        let name = opts
            .cgroup_name
            .clone()
            .unwrap_or_else(|| format!("graftd-{}", std::process::id()));
        let placement = Placement::enter(&name, pins.is_some())?;
        // From here on, an error drops `placement`, which moves us back
        // (when nothing is pinned).
        let mut links = attach_to_cgroup(
            &ebpf,
            CGROUP_PROGRAMS,
            &placement.fd,
            &placement.dir,
            pins.as_ref().map(|p| p.links.as_path()),
        )?;
        let sk_lookup_pin = pins.as_ref().map(|p| p.links.join("graft_sk_lookup"));
        let steer = match attach_sk_lookup(&mut ebpf, sk_lookup_pin.as_deref()) {
            Ok((map, link)) => {
                links.push(link);
                Ok(map)
            }
            Err(why) => Err(why),
        };
        let mut c = Companion {
            _links: links,
            ebpf,
            sk,
            policies,
            counters,
            global,
            ids,
            next,
            mark_next,
            _socks: socks,
            app_opts,
            steer,
            endpoints: StdHashMap::new(),
            tallies: StdHashMap::new(),
            next_id: 1,
            splice: opts.splice,
            splice_errors_seen: 0,
            pinned: pins.map(|p| p.dir),
            placement,
        };
        c.adopt_ids();
        Ok(c)
    }

    /// Reads the endpoint ids an earlier graftd left in the pinned maps.
    fn adopt_ids(&mut self) {
        let mut max = 0u32;
        for (k, v) in self.ids.iter().filter_map(Result::ok) {
            let Some(key) = k.endpoint_key() else {
                continue;
            };
            max = max.max(v.id);
            self.endpoints.insert(key, v.id);
            self.tallies.insert(
                v.id,
                Tally {
                    handed: v.handed,
                    released: 0,
                },
            );
        }
        let stored = self.next.get(&0, 0).unwrap_or(0);
        let next = u64::from(max).saturating_add(1).max(stored).max(1);
        self.next_id = u32::try_from(next).unwrap_or(1);
        if !self.endpoints.is_empty() {
            log::info!(
                "eBPF companion: adopted {} endpoint id(s) from {}",
                self.endpoints.len(),
                self.pinned
                    .as_deref()
                    .map_or_else(String::new, |p| p.display().to_string())
            );
        }
    }

    /// Forgets every endpoint not in `keep` (their namespaces went away
    /// while no graftd ran): policies, counters and ids go; their sockets
    /// still open are refused further connects (fail closed).
    pub fn retain_endpoints(&mut self, keep: &[EndpointKey]) {
        let stale: Vec<EndpointKey> = self
            .endpoints
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        for k in stale {
            self.remove_endpoint(&k);
        }
    }

    /// The pin directory, when the companion outlives the process.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// The cgroup the programs are attached to (and the process runs in).
    pub fn cgroup(&self) -> &Path {
        &self.placement.dir
    }

    /// The cgroup the process came from.
    pub fn original_cgroup(&self) -> PathBuf {
        self.placement.original.clone()
    }

    /// Whether a marked socket refuses every `bind()` (cgroup bind4/bind6;
    /// always, once started). graftd may then leave an egress socket's port
    /// to `connect()`: nobody can re-bind it afterwards.
    pub fn bind_guarded(&self) -> bool {
        true
    }

    /// Whether splicing is on.
    pub fn splice(&self) -> bool {
        self.splice
    }

    /// Defines (or redefines the policy of) an endpoint; returns its id.
    pub fn add_endpoint(&mut self, key: EndpointKey, policy: &[PolicyRule]) -> Result<u32, Error> {
        let table = maps::compile_policy(policy).ok_or_else(|| Error::PolicyTooLong {
            name: key.name.to_string(),
            len: policy.len(),
            max: maps::MAX_RULES,
        })?;
        let (id, new) = match self.endpoints.get(&key) {
            Some(id) => (*id, false),
            None => {
                let id = self.next_id;
                (id, true)
            }
        };
        self.policies
            .insert(id, table, 0)
            .map_err(bpf_err(format!("store policy of endpoint {}", key.name)))?;
        if new {
            if let Err(e) = self.counters.insert(id, GraftCounters::default(), 0) {
                let _ = self.policies.remove(&id);
                return Err(bpf_err(format!("create counters of endpoint {}", key.name))(e));
            }
            let v = maps::GraftEpVal {
                id,
                pad: 0,
                handed: 0,
            };
            if let Err(e) = self.ids.insert(maps::GraftEpKey::new(&key), v, 0) {
                let _ = self.policies.remove(&id);
                let _ = self.counters.remove(&id);
                return Err(bpf_err(format!("record the id of endpoint {}", key.name))(
                    e,
                ));
            }
            self.next_id = self.next_id.wrapping_add(1).max(1);
            let _ = self.next.set(0, u64::from(self.next_id), 0);
            self.endpoints.insert(key, id);
            self.tallies.insert(id, Tally::default());
        }
        Ok(id)
    }

    /// Forgets an endpoint: its counters go, and sockets it handed out that
    /// are still open are refused any further connect/sendto (their policy is
    /// gone; fail closed).
    pub fn remove_endpoint(&mut self, key: &EndpointKey) {
        if let Some(id) = self.endpoints.remove(key) {
            self.tallies.remove(&id);
            let _ = self.policies.remove(&id);
            let _ = self.counters.remove(&id);
            let _ = self.ids.remove(&maps::GraftEpKey::new(key));
        }
    }

    /// Marks a socket graftd hands out as belonging to `key` (which must have
    /// been added) and counts it as live. Non-inet sockets are accepted and
    /// ignored.
    pub fn register_socket(&mut self, fd: BorrowedFd<'_>, key: &EndpointKey) -> Result<(), Error> {
        match self.register_sockets(&[fd], key, None) {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    /// [`Companion::register_socket`] for a batch of sockets of one kind
    /// (non-inet ones are accepted and ignored), held to `limit` live
    /// sockets (handed out and not closed: cgroup/sock_release counts the
    /// closes): marks and counts sockets from the first while the limit allows, reading and writing
    /// the endpoint's count once for all of them. Returns how many were
    /// registered and, when not all, why the next was refused.
    pub fn register_sockets(
        &mut self,
        fds: &[BorrowedFd<'_>],
        key: &EndpointKey,
        limit: Option<u32>,
    ) -> (usize, Option<Error>) {
        self.register_marked(fds, key, limit, false)
    }

    /// [`Companion::register_sockets`]; with `no_join` the sockets never
    /// join the splice (`GRAFT_SK_NO_JOIN`, in the same mark).
    fn register_marked(
        &mut self,
        fds: &[BorrowedFd<'_>],
        key: &EndpointKey,
        limit: Option<u32>,
        no_join: bool,
    ) -> (usize, Option<Error>) {
        let Some(&id) = self.endpoints.get(key) else {
            let e = Error::UnknownEndpoint {
                name: key.name.to_string(),
                netns: key.netns,
            };
            return (0, Some(e));
        };
        // A batch answers one request: its sockets are all of one kind.
        if !fds.first().is_some_and(|&fd| is_inet(fd)) {
            return (fds.len(), None);
        }
        let mut v = self.ep_val(id);
        let live_before = self.live_within(id, v.handed, fds.len(), limit);
        let mut done = 0;
        let mut why = None;
        for &fd in fds {
            let live = live_before + done as u64;
            if limit.is_some_and(|l| live >= u64::from(l)) {
                why = Some(Error::LimitReached {
                    name: key.name.to_string(),
                    live,
                });
                break;
            }
            let marked = GraftSk {
                endpoint: id,
                flags: handed_flags(no_join),
                cookie: socket_cookie(fd),
            };
            if let Err(e) = self.sk.insert(&fd.as_raw_fd(), marked, 0) {
                why = Some(bpf_err(format!("mark socket of endpoint {}", key.name))(e));
                break;
            }
            v.handed += 1;
            done += 1;
        }
        if done == 0 {
            return (done, why);
        }
        // Only graftd writes this entry (under the caller's lock), so the
        // read-modify-write cannot lose a count.
        match self.ids.insert(maps::GraftEpKey::new(key), v, 0) {
            Ok(()) => {
                self.tallies.entry(id).or_default().handed = v.handed;
                (done, why)
            }
            // The marked sockets are refused too: handing out sockets the
            // count does not know would let closes drive it below zero.
            Err(e) => (
                0,
                Some(bpf_err(format!("count a socket of endpoint {}", key.name))(
                    e,
                )),
            ),
        }
    }

    /// Arms marking at creation: the next `want` inet sockets the calling
    /// thread makes, at most as many as `key`'s `limit` still allows, are
    /// marked as handed-out sockets of `key` by `graft_sock_create` as the
    /// kernel makes them, which spares [`Companion::register_sockets`]'s
    /// map update and `SO_COOKIE` read per socket. The endpoint is added
    /// with `policy` first when needed. Make the sockets on this thread, then
    /// settle with [`Companion::settle_marks`] before this thread makes any
    /// other inet socket. With `no_join` they never join the splice (a
    /// client opening connection after connection). Err: nothing may be
    /// made (limit reached, endpoint refused, map update failed).
    pub fn arm_marks(
        &mut self,
        key: &EndpointKey,
        policy: &[PolicyRule],
        want: usize,
        limit: Option<u32>,
        no_join: bool,
    ) -> Result<Armed, Error> {
        let id = match self.endpoints.get(key) {
            Some(&id) => id,
            None => self.add_endpoint(*key, policy)?,
        };
        let handed = self.ep_val(id).handed;
        let live = self.live_within(id, handed, want, limit);
        let room = limit.map_or(u64::MAX, |l| u64::from(l).saturating_sub(live));
        if room == 0 {
            return Err(Error::LimitReached {
                name: key.name.to_string(),
                live,
            });
        }
        let n = (want as u64).min(room).min(u64::from(u32::MAX)) as u32;
        let tid = thread_key();
        let mark = maps::GraftMark {
            endpoint: id,
            flags: handed_flags(no_join),
            left: n,
            pad: 0,
        };
        self.mark_next
            .insert(tid, mark, 0)
            .map_err(bpf_err(format!("arm marking for endpoint {}", key.name)))?;
        Ok(Armed {
            tid,
            key: *key,
            n,
            limit,
            no_join,
        })
    }

    /// Disarms `armed` and counts `fds`, the sockets made on its thread
    /// since (in order), as handed out. All of them must have been marked
    /// as they were made; if none was (the kernel did not run
    /// `graft_sock_create` for this thread), they are marked the ordinary
    /// way; if only some were, none is handed out (which ones are marked is
    /// unknown). The limit is checked again (another thread may have
    /// registered sockets of the endpoint meanwhile). Returns how many may
    /// be handed out, from the first, and why not more.
    pub fn settle_marks(&mut self, armed: Armed, fds: &[BorrowedFd<'_>]) -> (usize, Option<Error>) {
        let left = self.mark_next.get(&armed.tid, 0).ok().map(|m| m.left);
        // Disarmed whatever happens next: a leftover count would mark the
        // thread's next inet sockets.
        if let Err(e) = self.mark_next.remove(&armed.tid) {
            return (0, Some(bpf_err("disarm marking")(e)));
        }
        let marked = left.map_or(0, |l| armed.n.saturating_sub(l) as usize);
        if marked == 0 && !fds.is_empty() {
            return self.register_marked(fds, &armed.key, armed.limit, armed.no_join);
        }
        // Every socket marked here counts as handed out: one refused below,
        // or made and closed again by a failed bind, is released unused, and
        // cgroup/sock_release counts that. (One more marked than made is the
        // last one, closed by the failure that ended the batch.)
        let counted = self.count_handed(&armed.key, marked, armed.limit);
        if marked < fds.len() {
            let e = Error::Bpf {
                op: format!(
                    "mark {} socket(s) of endpoint {} as made",
                    fds.len(),
                    armed.key.name
                ),
                detail: format!("{marked} marked"),
            };
            return (0, Some(e));
        }
        match counted {
            // Another graftd thread may have registered sockets of the
            // endpoint since it was armed: the limit is checked again.
            Ok(live_before) => match armed.limit {
                Some(l) if live_before + fds.len() as u64 > u64::from(l) => {
                    let room = u64::from(l).saturating_sub(live_before) as usize;
                    let e = Error::LimitReached {
                        name: armed.key.name.to_string(),
                        live: live_before + room as u64,
                    };
                    (room, Some(e))
                }
                _ => (fds.len(), None),
            },
            Err(e) => (0, Some(e)),
        }
    }

    /// Adds `n` to the sockets `key` handed out; returns its live count
    /// before them, as far as `limit` needs it (see
    /// [`Companion::live_within`]).
    fn count_handed(
        &mut self,
        key: &EndpointKey,
        n: usize,
        limit: Option<u32>,
    ) -> Result<u64, Error> {
        let Some(&id) = self.endpoints.get(key) else {
            return Err(Error::UnknownEndpoint {
                name: key.name.to_string(),
                netns: key.netns,
            });
        };
        let mut v = self.ep_val(id);
        let live = self.live_within(id, v.handed, n, limit);
        if n == 0 {
            return Ok(live);
        }
        v.handed += n as u64;
        // As in register_sockets: only graftd writes this entry, under the
        // caller's lock.
        self.ids
            .insert(maps::GraftEpKey::new(key), v, 0)
            .map_err(bpf_err(format!("count a socket of endpoint {}", key.name)))?;
        self.tallies.entry(id).or_default().handed = v.handed;
        Ok(live)
    }

    /// Endpoint `id`'s entry in `graft_ep_ids`, as graftd last wrote it.
    fn ep_val(&self, id: u32) -> maps::GraftEpVal {
        maps::GraftEpVal {
            id,
            pad: 0,
            handed: self.tallies.get(&id).map_or(0, |t| t.handed),
        }
    }

    /// Closes of endpoint `id`'s sockets so far (a counters lookup).
    fn released(&self, id: u32) -> u64 {
        self.counters.get(&id, 0).map(|c| c.released).unwrap_or(0)
    }

    fn live_of(&self, id: u32, handed: u64) -> u64 {
        handed.saturating_sub(self.released(id))
    }

    /// The live count of endpoint `id` (which has handed out `handed`)
    /// as far as `limit` needs it before `more` new sockets: 0 without a
    /// limit; else at most `handed` minus the closes last seen (closes only
    /// add up), and the exact count (a counters lookup) only when that
    /// bound leaves no room for them.
    fn live_within(&mut self, id: u32, handed: u64, more: usize, limit: Option<u32>) -> u64 {
        let Some(l) = limit else {
            return 0;
        };
        let seen = self.tallies.get(&id).map_or(0, |t| t.released);
        let at_most = handed.saturating_sub(seen);
        if at_most.saturating_add(more as u64) <= u64::from(l) {
            return at_most;
        }
        let released = self.released(id);
        self.tallies.entry(id).or_default().released = released;
        handed.saturating_sub(released)
    }

    /// Sockets of an endpoint handed out and still open (`None` if unknown).
    pub fn live(&self, key: &EndpointKey) -> Option<u64> {
        let id = *self.endpoints.get(key)?;
        let v = self.ids.get(&maps::GraftEpKey::new(key), 0).ok()?;
        Some(self.live_of(id, v.handed))
    }

    /// [`Companion::register_sockets`], adding the endpoint with `policy`
    /// first when needed; with `no_join` the sockets never join the splice
    /// (a client opening connection after connection).
    pub fn register_sockets_with_policy(
        &mut self,
        fds: &[BorrowedFd<'_>],
        key: &EndpointKey,
        policy: &[PolicyRule],
        limit: Option<u32>,
        no_join: bool,
    ) -> (usize, Option<Error>) {
        if !self.endpoints.contains_key(key) {
            if let Err(e) = self.add_endpoint(*key, policy) {
                return (0, Some(e));
            }
        }
        self.register_marked(fds, key, limit, no_join)
    }

    /// Starts recording, for every inet socket made from now on in the
    /// cgroup of process `pid`, which of `graft_core::sockopt::SNAPSHOT`'s
    /// options it is set (read back with [`Companion::app_socket`]), until
    /// the returned watch is dropped. `None` when that cgroup is the
    /// hierarchy's root, graftd's own or one above it (every socket of the
    /// host, or graftd's, would carry a record) or cannot be seen.
    pub fn watch_options(&self, pid: u32) -> Result<Option<OptionWatch>, Error> {
        let Some(dir) = cgroup::of_process(pid)? else {
            return Ok(None);
        };
        // Programs attached to a cgroup run for its whole subtree: not on
        // graftd's own sockets.
        if self.placement.dir.starts_with(&dir) {
            return Ok(None);
        }
        let target = std::fs::File::open(&dir).map_err(|source| Error::Io {
            op: format!("open cgroup {}", dir.display()),
            source,
        })?;
        let links = attach_to_cgroup(&self.ebpf, WATCH_PROGRAMS, &target, &dir, None)?;
        Ok(Some(OptionWatch { _links: links }))
    }

    /// What socket `fd` was made as, in which namespace, and which options
    /// were set on it since (bit i: `SNAPSHOT[i]`), if it was made under a
    /// watch; `None`: its history is unknown.
    pub fn app_socket(&self, fd: BorrowedFd<'_>) -> Option<AppSocket> {
        let r = self.app_opts.get(&fd.as_raw_fd(), 0).ok()?;
        Some(AppSocket {
            options_set: r.set,
            netns_cookie: r.netns,
            kind: (r.family != 0).then_some((
                r.family as libc::c_int,
                r.sotype as libc::c_int,
                r.protocol as libc::c_int,
            )),
        })
    }

    /// Keeps the marked socket `fd` (and, for a listener, every connection
    /// it accepts) out of splicing: its holder's reads are not the preload
    /// library's, which alone repeats the EAGAIN a blocking read of a
    /// spliced socket can see. Nothing to do with splicing off.
    pub fn keep_off_splice(&mut self, fd: BorrowedFd<'_>) -> Result<(), Error> {
        if !self.splice {
            return Ok(());
        }
        let raw = fd.as_raw_fd();
        let mut mark = self
            .sk
            .get(&raw, 0)
            .map_err(bpf_err("read the mark of a socket to keep off splicing"))?;
        mark.flags |= maps::SK_NO_JOIN;
        self.sk
            .insert(&raw, mark, 0)
            .map_err(bpf_err("keep a socket off splicing"))
    }

    /// The endpoint id a socket is marked with, if any.
    pub fn socket_endpoint(&self, fd: BorrowedFd<'_>) -> Option<u32> {
        let raw = fd.as_raw_fd();
        self.sk.get(&raw, 0).ok().map(|s| s.endpoint)
    }

    /// An endpoint's counters (`None` if it is unknown).
    pub fn counters(&self, key: &EndpointKey) -> Option<Counters> {
        let id = self.endpoints.get(key)?;
        self.counters.get(id, 0).ok()
    }

    /// A new failure to put a socket into the splice map since the last call,
    /// as one line to log (EBUSY: the socket already has another sk_msg
    /// owner, e.g. a stale program from another tool or an earlier run).
    pub fn splice_problem(&mut self) -> Option<String> {
        let g = self.global.get(&0, 0).ok()?;
        if g.splice_errors == self.splice_errors_seen {
            return None;
        }
        let new = g.splice_errors - self.splice_errors_seen;
        self.splice_errors_seen = g.splice_errors;
        let errno = -(g.last_splice_error as i64);
        let why = if errno == i64::from(libc::EBUSY) {
            "EBUSY: the socket is already owned by another sk_msg/sockmap program \
             (stale attachment? see `bpftool cgroup tree` and `bpftool map`)"
                .to_owned()
        } else {
            std::io::Error::from_raw_os_error(errno as i32).to_string()
        };
        Some(format!(
            "splice: {new} connection(s) could not be spliced and use TCP: {why}"
        ))
    }

    /// Gives access to the loaded object (tests, diagnostics).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// Why dual-stack steering is unavailable (`None`: it is available).
    pub fn steer_problem(&self) -> Option<&str> {
        self.steer.as_ref().err().map(String::as_str)
    }

    /// Makes `listener` (an AF_INET6 socket of graftd's own namespace bound
    /// to a v4-mapped address, not v6-only, already listening) also answer
    /// IPv6 connections to `[addr]:port` (`::`: any local address), through
    /// `graft_sk_lookup`. The entry goes away when the socket is closed.
    pub fn steer_v6(
        &mut self,
        listener: BorrowedFd<'_>,
        addr: std::net::Ipv6Addr,
        port: u16,
        protocol: i32,
    ) -> Result<(), Error> {
        let map = self.steer.as_mut().map_err(|why| Error::Bpf {
            op: "steer IPv6 connections to a dual-stack listener".into(),
            detail: why.clone(),
        })?;
        let mut key = [0u8; 24];
        key[..16].copy_from_slice(&addr.octets());
        key[16..20].copy_from_slice(&u32::from(port).to_ne_bytes());
        key[20..24].copy_from_slice(&(protocol as u32).to_ne_bytes());
        map.insert(key, listener.as_raw_fd(), 0)
            .map_err(bpf_err(format!(
                "steer [{addr}]:{port} to a dual-stack listener"
            )))
    }
}

/// Loads `graft_sk_lookup` and attaches it to the calling process's network
/// namespace (graftd's own, where its endpoints usually live); the steering
/// map on success, else one line saying why (dual-stack listeners then
/// answer on their IPv6 endpoint only; nothing else depends on it).
///
/// Like the cgroup programs it is attached by a bpf_link, pinned (as
/// `PIN_DIR/links/graft_sk_lookup`, with `graft_steer` among the pinned maps)
/// when the companion is: listeners handed out before a restart stay steered.
fn attach_sk_lookup(
    ebpf: &mut Ebpf,
    pin_path: Option<&Path>,
) -> Result<(SockHash<MapData, [u8; 24]>, OwnedFd), String> {
    let map: SockHash<MapData, [u8; 24]> = take(ebpf, "graft_steer").map_err(|e| e.to_string())?;
    let netns = std::fs::File::open("/proc/self/ns/net")
        .map_err(|e| format!("open /proc/self/ns/net: {e}"))?;
    let p: &mut SkLookup = prog(ebpf, "graft_sk_lookup").map_err(|e| e.to_string())?;
    p.load()
        .map_err(|e| bpf_err("load program graft_sk_lookup")(e).to_string())?;
    let fd = p
        .fd()
        .map_err(|e| bpf_err("program graft_sk_lookup")(e).to_string())?;
    let link = attach_link(
        fd.as_fd(),
        netns.as_fd(),
        "graftd's network namespace",
        "graft_sk_lookup",
        attach::SK_LOOKUP,
        pin_path,
    )
    .map_err(|e| e.to_string())?;
    Ok((map, link))
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| Error::Bpf {
        op: format!("find program {name}"),
        detail: "missing from the object".into(),
    })?;
    p.try_into().map_err(bpf_err(format!("program {name}")))
}

/// The socket's cookie (what `bpf_get_socket_cookie` returns for it); 0 if
/// it cannot be read (the socket then never counts as released).
fn socket_cookie(fd: BorrowedFd<'_>) -> u64 {
    // SO_COOKIE writes a u64.
    let mut b = [0u8; 8];
    match sockopt::get(fd, libc::SOL_SOCKET, libc::SO_COOKIE, &mut b) {
        Ok(_) => u64::from_ne_bytes(b),
        Err(_) => 0,
    }
}

fn is_inet(fd: BorrowedFd<'_>) -> bool {
    matches!(
        sockopt::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN),
        Ok(libc::AF_INET | libc::AF_INET6)
    )
}

fn load_program(ebpf: &mut Ebpf, name: &str, kind: Kind) -> Result<(), Error> {
    let r = match kind {
        Kind::SockAddr => prog::<CgroupSockAddr>(ebpf, name)?.load(),
        Kind::SockOps => prog::<SockOps>(ebpf, name)?.load(),
        Kind::Sockopt => prog::<CgroupSockopt>(ebpf, name)?.load(),
        Kind::Sock => prog::<CgroupSock>(ebpf, name)?.load(),
    };
    r.map_err(bpf_err(format!("load program {name}")))
}

/// Refuses pinned maps whose shape differs from this build's (left by another
/// graft version): adopting one would hand the programs a map of another
/// layout. The old programs stay attached and armed until `graftd --remove`.
fn check_pinned_maps(dir: &Path) -> Result<(), Error> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(bpf_err("parse eBPF object"))?;
    for name in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(def) = obj.maps.get(*name) else {
            continue;
        };
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(bpf_err(format!("open pinned map {name}")))?;
        // The kind too: a map may change kind and keep its sizes.
        let kind = info.map_type().map_or(u32::MAX, |t| t as u32);
        let have = (kind, info.key_size(), info.value_size(), info.max_entries());
        let want = (
            def.map_type(),
            def.key_size(),
            def.value_size(),
            def.max_entries(),
        );
        if have != want {
            return Err(Error::Bpf {
                op: format!("adopt pinned map {}", path.display()),
                detail: format!(
                    "it was made by another graft version (type/key/value/entries \
                     {}/{}/{}/{}, this one needs {}/{}/{}/{}): stop graftd and run graftd --remove \
                     (with the same --pin-dir and --cgroup) before starting this version",
                    have.0, have.1, have.2, have.3, want.0, want.1, want.2, want.3
                ),
            });
        }
    }
    Ok(())
}

/// Where a pinned companion keeps things.
struct PinDirs {
    dir: PathBuf,
    maps: PathBuf,
    links: PathBuf,
}

/// Makes sure `dir` is on bpffs (mounting bpffs on /sys/fs/bpf when nothing
/// is mounted there, as systemd would at boot) and creates its subdirectories.
fn prepare_pin_dir(dir: &Path) -> Result<PinDirs, Error> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    let parent = dir.parent().unwrap_or(dir);
    if !pin::on_bpffs(parent) && parent == sys_bpf {
        pin::mount_bpffs(sys_bpf).map_err(|source| Error::Io {
            op: "mount bpffs on /sys/fs/bpf".into(),
            source,
        })?;
        log::info!("mounted bpffs on /sys/fs/bpf");
    }
    let maps = dir.join("maps");
    let links = dir.join("links");
    for d in [dir, &maps, &links] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            op: format!("create pin directory {}", d.display()),
            source,
        })?;
    }
    if !pin::on_bpffs(dir) {
        return Err(Error::Io {
            op: format!("pin directory {}", dir.display()),
            source: std::io::Error::other("not on a bpf filesystem (mount -t bpf bpf DIR)"),
        });
    }
    Ok(PinDirs {
        dir: dir.to_owned(),
        maps,
        links,
    })
}

/// Attaches each of `programs` (loaded) to the cgroup `dir`, opened as
/// `target`, as bpf_links; with `pin_links`, pinned there by name.
fn attach_to_cgroup(
    ebpf: &Ebpf,
    programs: &[(&str, Kind, u32)],
    target: &std::fs::File,
    dir: &Path,
    pin_links: Option<&Path>,
) -> Result<Vec<OwnedFd>, Error> {
    let desc = format!("cgroup {}", dir.display());
    programs
        .iter()
        .map(|(name, _, attach_type)| {
            let p = ebpf.program(name).ok_or_else(|| Error::Bpf {
                op: format!("find program {name}"),
                detail: "missing from the object".into(),
            })?;
            let fd = p.fd().map_err(bpf_err(format!("program {name}")))?;
            let pin = pin_links.map(|d| d.join(name));
            attach_link(
                fd.as_fd(),
                target.as_fd(),
                &desc,
                name,
                *attach_type,
                pin.as_deref(),
            )
        })
        .collect()
}

/// Attaches `prog` to the companion's cgroup as a bpf_link. With `pin`: a
/// link already pinned there gets `prog` in place, atomically (an upgrade or
/// restart: the hook is never empty); otherwise a new link is made and
/// pinned.
fn attach_link(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    target_desc: &str,
    name: &str,
    attach_type: u32,
    pin_path: Option<&Path>,
) -> Result<OwnedFd, Error> {
    let io = |op: String| move |source| Error::Io { op, source };
    if let Some(path) = pin_path {
        if path.exists() {
            let updated = pin::obj_get(path)
                .and_then(|link| pin::link_update(link.as_fd(), prog).map(|()| link));
            match updated {
                Ok(link) => return Ok(link),
                // A link whose cgroup was removed (ENOLINK), or of another
                // kind: replaced by a new one.
                Err(e) => {
                    log::warn!(
                        "pinned link {} cannot take the new {name} ({e}); attaching anew",
                        path.display()
                    );
                    std::fs::remove_file(path)
                        .map_err(io(format!("remove stale pin {}", path.display())))?;
                }
            }
        }
    }
    let link = pin::link_create(prog, target, attach_type)
        .map_err(io(format!("attach {name} to {target_desc}")))?;
    if let Some(path) = pin_path {
        pin::obj_pin(link.as_fd(), path).map_err(io(format!("pin {}", path.display())))?;
    }
    Ok(link)
}

/// Removes a pinned companion: its links (detaching the programs), its maps
/// (socket marks, policies, counters) and the pin directory, then the cgroup
/// if no process is left in it. Refuses while a process runs in that cgroup
/// (a graftd still serving). `cgroup_name` is as in [`Options`].
pub fn remove_pinned(pin_dir: &Path, cgroup_name: &str) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    let cg = cgroup::locate(cgroup_name)?;
    if let Some(cg) = &cg {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return Err(Error::Io {
                op: format!("remove cgroup {}", cg.display()),
                source: std::io::Error::other(format!(
                    "processes still run in it ({}): stop graftd first",
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                )),
            });
        }
    }
    for sub in ["links", "maps"] {
        let d = pin_dir.join(sub);
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            std::fs::remove_file(e.path()).map_err(|source| Error::Io {
                op: format!("unpin {}", e.path().display()),
                source,
            })?;
            done.push(format!("unpinned {}", e.path().display()));
        }
        let _ = std::fs::remove_dir(&d);
    }
    remove_dir_if_there(pin_dir, "", &mut done)?;
    if let Some(cg) = cg {
        remove_dir_if_there(&cg, "cgroup ", &mut done)?;
    }
    Ok(done)
}

/// Removes the (empty) directory `what dir`, saying so in `done`; one
/// already gone is no error.
fn remove_dir_if_there(dir: &Path, what: &str, done: &mut Vec<String>) -> Result<(), Error> {
    match std::fs::remove_dir(dir) {
        Ok(()) => done.push(format!("removed {what}{}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Io {
                op: format!("remove {what}{}", dir.display()),
                source,
            })
        }
    }
    Ok(())
}
