//! `graft-ebpf`: graft's kernel-side companion.
//!
//! Small eBPF programs, written in C (`src/bpf/graft.bpf.c`, compiled by
//! `build.rs` with clang and embedded here), that graftd loads with `aya` and
//! attaches to a cgroup v2 of its own. Every socket graftd hands out was
//! created by graftd, so it belongs to that cgroup for life, wherever the
//! program using it runs; connections accepted on a grafted listener inherit
//! the listener's cgroup. No other socket on the machine is seen.
//!
//! How it works:
//! * graftd marks each socket it hands out with its endpoint id in a
//!   socket-local storage map ([`Companion::register_socket`]). The map is
//!   created with `BPF_F_CLONE`, so the kernel copies the mark onto every
//!   connection accepted from a marked listener, and frees it with the socket:
//!   no table to clean up. Unmarked sockets are never touched.
//! * cgroup `connect4/6`, `sendmsg4/6` enforce the endpoint's `allow`/`deny`
//!   clauses with the semantics of [`graft_core::rules::policy_allows`]; a
//!   refused call fails with EPERM and counts in `policy_denied`.
//! * `sockops` counts connections established actively and passively, and the
//!   bytes of each connection when it closes; with splicing on, it puts each
//!   established grafted socket into a socket hash keyed by (netns cookie,
//!   family, local and remote address and port).
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
//! * Splicing is off by default (`graftd --splice`). It only joins two
//!   grafted sockets (a host socket cannot opt in: it is not in graftd's
//!   cgroup, and marking arbitrary host sockets would reach beyond graft's
//!   own). Spliced sockets take the kernel's sockmap receive path
//!   (`tcp_bpf_recvmsg`), which differs from plain TCP in one way an
//!   application can notice: a blocking `recv()` may fail with EAGAIN after a
//!   wake-up that brought no data (seen on 6.18 while another thread writes
//!   to the same socket's memory being freed: `tcp_msg_wait_data` returns
//!   after one wake-up, and `tcp_bpf_recvmsg` turns "no data" into EAGAIN).
//!   Event-driven programs (poll/epoll, non-blocking sockets, CPython with a
//!   socket timeout) are unaffected (poll and FIONREAD see redirected
//!   bytes); for blocking readers libgraft-convert repeats such a receive.
//!   It stays opt-in because the throughput and latency goals are not met
//!   unpinned (see bench/results/2026-12-01-churn.md).
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

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, SkStorage, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use graft_core::rules::PolicyRule;
use graft_core::{EndpointName, NetnsId};

pub use cgroup::Placement;
pub use maps::{GraftCounters, GraftGlobal, GraftSk};

/// The compiled programs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/graft.bpf.o"));

/// The compiled eBPF object (ELF with BTF), for diagnostics and for tests
/// that need a second, independent instance of the programs.
pub fn object() -> &'static [u8] {
    OBJECT
}

const CGROUP_PROGRAMS: [&str; 6] = [
    "graft_connect4",
    "graft_connect6",
    "graft_sendmsg4",
    "graft_sendmsg6",
    // The bind guard: see `Companion::bind_guarded`.
    "graft_bind4",
    "graft_bind6",
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
    /// Splice local grafted↔grafted TCP connections (`graftd --splice`).
    pub splice: bool,
    /// Name of the cgroup made under the current one; `graftd-PID` if unset.
    pub cgroup_name: Option<String>,
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
/// process back to its original cgroup and removes the one it made.
pub struct Companion {
    // Field order is drop order: programs and maps go before the process
    // leaves the cgroup they were attached to.
    ebpf: Ebpf,
    sk: SkStorage<MapData, GraftSk>,
    policies: HashMap<MapData, u32, maps::GraftPolicy>,
    counters: HashMap<MapData, u32, GraftCounters>,
    global: Array<MapData, GraftGlobal>,
    _socks: Option<SockHash<MapData, [u8; 56]>>,
    /// The dual-stack steering map, when `graft_sk_lookup` is attached to
    /// graftd's own namespace; else why not.
    steer: Result<SockHash<MapData, [u8; 24]>, String>,
    endpoints: StdHashMap<EndpointKey, u32>,
    next_id: u32,
    splice: bool,
    splice_errors_seen: u64,
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
    /// Loads the programs, moves the process into a cgroup of its own and
    /// attaches them there.
    pub fn start(opts: &Options) -> Result<Self, Error> {
        let splice = u32::from(opts.splice);
        // The bind guard lets this process's own binds through (it binds
        // before it marks; tests playing graftd bind after).
        let binder = std::process::id();
        // Load before touching cgroups: a kernel without BTF or without the
        // privileges fails here with nothing to undo.
        // No CO-RE relocations in our programs: skip parsing the kernel BTF
        // (megabytes, seconds in a debug build); maps still carry their BTF.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global("splice_enabled", &splice, true)
            .override_global("binder_tgid", &binder, true)
            .load(OBJECT)
            .map_err(bpf_err("load eBPF object"))?;
        for name in CGROUP_PROGRAMS {
            let p: &mut CgroupSockAddr = prog(&mut ebpf, name)?;
            p.load().map_err(bpf_err(format!("load program {name}")))?;
        }
        let so: &mut SockOps = prog(&mut ebpf, "graft_sockops")?;
        so.load().map_err(bpf_err("load program graft_sockops"))?;
        let sso: &mut CgroupSockopt = prog(&mut ebpf, "graft_setsockopt")?;
        sso.load()
            .map_err(bpf_err("load program graft_setsockopt"))?;

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

        let name = opts
            .cgroup_name
            .clone()
            .unwrap_or_else(|| format!("graftd-{}", std::process::id()));
        let placement = Placement::enter(&name)?;
        // From here on, an error drops `placement`, which moves us back.
        // aya attaches through bpf_link on every kernel this runs on; a link
        // takes no flags and coexists with other programs like ALLOW_MULTI.
        for name in CGROUP_PROGRAMS {
            let p: &mut CgroupSockAddr = prog(&mut ebpf, name)?;
            p.attach(&placement.fd, CgroupAttachMode::Single)
                .map_err(bpf_err(format!(
                    "attach {name} to cgroup {}",
                    placement.dir.display()
                )))?;
        }
        let so: &mut SockOps = prog(&mut ebpf, "graft_sockops")?;
        so.attach(&placement.fd, CgroupAttachMode::Single)
            .map_err(bpf_err(format!(
                "attach graft_sockops to cgroup {}",
                placement.dir.display()
            )))?;
        let sso: &mut CgroupSockopt = prog(&mut ebpf, "graft_setsockopt")?;
        sso.attach(&placement.fd, CgroupAttachMode::Single)
            .map_err(bpf_err(format!(
                "attach graft_setsockopt to cgroup {}",
                placement.dir.display()
            )))?;
        let steer = attach_sk_lookup(&mut ebpf);
        Ok(Companion {
            ebpf,
            sk,
            policies,
            counters,
            global,
            _socks: socks,
            steer,
            endpoints: StdHashMap::new(),
            next_id: 1,
            splice: opts.splice,
            splice_errors_seen: 0,
            placement,
        })
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
            self.next_id = self.next_id.wrapping_add(1).max(1);
            self.endpoints.insert(key, id);
        }
        Ok(id)
    }

    /// Forgets an endpoint: its counters go, and sockets it handed out that
    /// are still open are refused any further connect/sendto (their policy is
    /// gone; fail closed).
    pub fn remove_endpoint(&mut self, key: &EndpointKey) {
        if let Some(id) = self.endpoints.remove(key) {
            let _ = self.policies.remove(&id);
            let _ = self.counters.remove(&id);
        }
    }

    /// Marks a socket graftd hands out as belonging to `key` (which must have
    /// been added). Non-inet sockets are accepted and ignored.
    pub fn register_socket(&mut self, fd: BorrowedFd<'_>, key: &EndpointKey) -> Result<(), Error> {
        let id = *self
            .endpoints
            .get(key)
            .ok_or_else(|| Error::UnknownEndpoint {
                name: key.name.to_string(),
                netns: key.netns,
            })?;
        if !is_inet(fd) {
            return Ok(());
        }
        let raw = fd.as_raw_fd();
        self.sk
            .insert(
                &raw,
                GraftSk {
                    endpoint: id,
                    flags: 0,
                },
                0,
            )
            .map_err(bpf_err(format!("mark socket of endpoint {}", key.name)))
    }

    /// [`Companion::add_endpoint`] when needed, then
    /// [`Companion::register_socket`].
    pub fn register_socket_with_policy(
        &mut self,
        fd: BorrowedFd<'_>,
        key: &EndpointKey,
        policy: &[PolicyRule],
    ) -> Result<(), Error> {
        if !self.endpoints.contains_key(key) {
            self.add_endpoint(*key, policy)?;
        }
        self.register_socket(fd, key)
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
fn attach_sk_lookup(ebpf: &mut Ebpf) -> Result<SockHash<MapData, [u8; 24]>, String> {
    let map: SockHash<MapData, [u8; 24]> = take(ebpf, "graft_steer").map_err(|e| e.to_string())?;
    let netns = std::fs::File::open("/proc/self/ns/net")
        .map_err(|e| format!("open /proc/self/ns/net: {e}"))?;
    let p: &mut SkLookup = prog(ebpf, "graft_sk_lookup").map_err(|e| e.to_string())?;
    p.load()
        .map_err(|e| bpf_err("load program graft_sk_lookup")(e).to_string())?;
    p.attach(&netns)
        .map_err(|e| bpf_err("attach graft_sk_lookup to graftd's namespace")(e).to_string())?;
    Ok(map)
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

fn is_inet(fd: BorrowedFd<'_>) -> bool {
    let mut dom: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is a valid borrowed descriptor; dom/len point to an int
    // and its size, which is what SO_DOMAIN writes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut dom as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && (dom == libc::AF_INET || dom == libc::AF_INET6)
}
