//! Socket options a grafted socket inherits from the application's socket.
//!
//! The preload library interposes `setsockopt` and records, per descriptor,
//! which options of [`SNAPSHOT`] the application set before the graft
//! decision; at graft time it reads back only those. For a socket whose
//! history it does not know (inherited across exec, received over
//! SCM_RIGHTS, duplicated, shared by fork) it falls back to reading every
//! option that applies to the socket's family and type, both from the
//! application's socket and from a freshly made socket of the same kind, and
//! keeps those that differ. Either way graftd gets only what the application
//! set. graftd applies the [`Class::Carry`] ones before binding (so
//! `SO_REUSEPORT` and `IPV6_V6ONLY` take effect) and refuses the whole request
//! when a [`Class::Refuse`] one is present, because it would let the container
//! leave the endpoint it was given (another device, a foreign address, a
//! routing mark). Anything not in the table is refused as unknown.

use libc::c_int;

/// `SO_NETNS_COOKIE` (Linux 5.14): a socket's network namespace as a number
/// never reused while the system runs. The same value on every
/// architecture graft builds for (x86_64, aarch64); the libc crate does
/// not export it there.
pub const SO_NETNS_COOKIE: c_int = 71;

/// How an option's value is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `c_int`.
    Int,
    /// `struct linger`.
    Linger,
    /// `struct timeval`.
    Timeval,
    /// A NUL-padded string of at most 16 bytes (device or congestion control name).
    Name16,
}

/// What graftd does with the option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Applied to the host socket before bind.
    Carry,
    /// Applied, but the value read back is twice what was set
    /// (`SO_RCVBUF`/`SO_SNDBUF`): the library sends half of it.
    CarryHalved,
    /// The request is refused with `EPERM`.
    Refuse,
}

/// Which sockets an option applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Any,
    /// AF_INET sockets only.
    Inet4,
    /// An IPv4-level option that counts on AF_INET6 sockets too (they carry
    /// IPv4 traffic when dual-stack, and the kernel accepts SOL_IP options
    /// on them): the escape options, so none slips through on either family.
    Inet,
    Inet6,
    Stream,
    Dgram,
}

/// One option of the snapshot list.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    pub level: c_int,
    pub name: c_int,
    pub kind: Kind,
    pub class: Class,
    pub scope: Scope,
    pub label: &'static str,
}

impl Kind {
    /// Bytes of the value.
    pub const fn size(self) -> usize {
        match self {
            Kind::Int => std::mem::size_of::<c_int>(),
            Kind::Linger => std::mem::size_of::<libc::linger>(),
            Kind::Timeval => std::mem::size_of::<libc::timeval>(),
            Kind::Name16 => 16,
        }
    }
}

macro_rules! opt {
    ($lvl:ident, $name:ident, $kind:ident, $class:ident, $scope:ident) => {
        Opt {
            level: libc::$lvl,
            name: libc::$name,
            kind: Kind::$kind,
            class: Class::$class,
            scope: Scope::$scope,
            label: stringify!($name),
        }
    };
}

/// Every option graft knows about.
///
/// The [`Class::Refuse`] ones each let the holder of a host socket choose
/// something its endpoint does not grant: an interface (SO_BINDTODEVICE,
/// SO_BINDTOIFINDEX, IP(V6)_UNICAST_IF, IP(V6)_MULTICAST_IF, the interface
/// half of a sticky IPV6_PKTINFO), a routing mark (SO_MARK), a source
/// address the socket is not bound to (IP(V6)_TRANSPARENT, IP(V6)_FREEBIND,
/// the address half of IPV6_PKTINFO) or the route itself (IP_OPTIONS source
/// routes, IPV6_RTHDR segment routing headers). graft-ebpf's cgroup
/// setsockopt guard refuses the same list on grafted sockets. Not refused:
/// IPV6_ADDR_PREFERENCES (it only orders the candidate source addresses of
/// a socket without one, and every grafted socket is bound to its
/// endpoint's address) and the receive-side IP_PKTINFO/IPV6_RECVPKTINFO
/// flags. Per-message IP_PKTINFO/IPV6_PKTINFO control messages on sendmsg()
/// are not options: graft-ebpf's sendmsg4/6 programs refuse a source
/// address other than the socket's own; the interface index they carry is
/// out of any cgroup hook's sight (see the README).
pub const SNAPSHOT: &[Opt] = &[
    opt!(SOL_SOCKET, SO_REUSEADDR, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_REUSEPORT, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_KEEPALIVE, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_BROADCAST, Int, Carry, Dgram),
    opt!(SOL_SOCKET, SO_LINGER, Linger, Carry, Any),
    opt!(SOL_SOCKET, SO_RCVBUF, Int, CarryHalved, Any),
    opt!(SOL_SOCKET, SO_SNDBUF, Int, CarryHalved, Any),
    opt!(SOL_SOCKET, SO_RCVLOWAT, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_RCVTIMEO, Timeval, Carry, Any),
    opt!(SOL_SOCKET, SO_SNDTIMEO, Timeval, Carry, Any),
    opt!(SOL_SOCKET, SO_OOBINLINE, Int, Carry, Stream),
    opt!(SOL_SOCKET, SO_PRIORITY, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_TIMESTAMP, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_TIMESTAMPNS, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_ZEROCOPY, Int, Carry, Any),
    opt!(SOL_SOCKET, SO_MARK, Int, Refuse, Any),
    opt!(SOL_SOCKET, SO_BINDTODEVICE, Name16, Refuse, Any),
    opt!(SOL_SOCKET, SO_BINDTOIFINDEX, Int, Refuse, Any),
    opt!(IPPROTO_IP, IP_TOS, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_TTL, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_RECVERR, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_PKTINFO, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_RECVTOS, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_RECVTTL, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_MTU_DISCOVER, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_MULTICAST_TTL, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_MULTICAST_LOOP, Int, Carry, Inet4),
    opt!(IPPROTO_IP, IP_FREEBIND, Int, Refuse, Inet),
    opt!(IPPROTO_IP, IP_TRANSPARENT, Int, Refuse, Inet),
    opt!(IPPROTO_IP, IP_UNICAST_IF, Int, Refuse, Inet),
    opt!(IPPROTO_IP, IP_MULTICAST_IF, Int, Refuse, Inet),
    opt!(IPPROTO_IP, IP_OPTIONS, Int, Refuse, Inet),
    opt!(IPPROTO_IPV6, IPV6_V6ONLY, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_TCLASS, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_UNICAST_HOPS, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_RECVPKTINFO, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_RECVERR, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_MTU_DISCOVER, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_MULTICAST_HOPS, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_MULTICAST_LOOP, Int, Carry, Inet6),
    opt!(IPPROTO_IPV6, IPV6_FREEBIND, Int, Refuse, Inet6),
    opt!(IPPROTO_IPV6, IPV6_TRANSPARENT, Int, Refuse, Inet6),
    opt!(IPPROTO_IPV6, IPV6_UNICAST_IF, Int, Refuse, Inet6),
    opt!(IPPROTO_IPV6, IPV6_MULTICAST_IF, Int, Refuse, Inet6),
    opt!(IPPROTO_IPV6, IPV6_PKTINFO, Int, Refuse, Inet6),
    opt!(IPPROTO_IPV6, IPV6_RTHDR, Int, Refuse, Inet6),
    opt!(IPPROTO_TCP, TCP_NODELAY, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_CORK, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_KEEPIDLE, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_KEEPINTVL, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_KEEPCNT, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_DEFER_ACCEPT, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_FASTOPEN, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_FASTOPEN_CONNECT, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_USER_TIMEOUT, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_MAXSEG, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_NOTSENT_LOWAT, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_WINDOW_CLAMP, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_SYNCNT, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_LINGER2, Int, Carry, Stream),
    opt!(IPPROTO_TCP, TCP_CONGESTION, Name16, Carry, Stream),
    opt!(IPPROTO_UDP, UDP_SEGMENT, Int, Carry, Dgram),
    opt!(IPPROTO_UDP, UDP_GRO, Int, Carry, Dgram),
];

impl Opt {
    /// Whether the option applies to a socket of this family and type.
    pub fn applies(&self, family: c_int, sotype: c_int) -> bool {
        match self.scope {
            Scope::Any => true,
            // IPv4-level options also work on dual-stack AF_INET6 sockets, but
            // their values only matter for v4 traffic there; carry them only
            // for AF_INET to keep the snapshot small.
            Scope::Inet4 => family == libc::AF_INET,
            Scope::Inet => family == libc::AF_INET || family == libc::AF_INET6,
            Scope::Inet6 => family == libc::AF_INET6,
            Scope::Stream => sotype == libc::SOCK_STREAM,
            Scope::Dgram => sotype == libc::SOCK_DGRAM,
        }
    }
}

/// `SOL_SOCKET` options that set the same socket field as another one, by
/// their asm-generic numbers (x86_64 and aarch64, the targets graft is built
/// for; the libc crate does not export them for glibc): the force variants
/// of the buffer sizes and the y2038 (`_NEW`) variants of the time options.
const ALIASES: [(c_int, c_int); 6] = [
    (32, libc::SO_SNDBUF),
    (33, libc::SO_RCVBUF),
    (63, libc::SO_TIMESTAMP),
    (64, libc::SO_TIMESTAMPNS),
    (66, libc::SO_RCVTIMEO),
    (67, libc::SO_SNDTIMEO),
];

/// The name of the option `name` at `level` sets under its [`SNAPSHOT`]
/// name: an option set under an alias must be carried over as the original.
pub fn canonical(level: c_int, name: c_int) -> c_int {
    if level != libc::SOL_SOCKET {
        return name;
    }
    ALIASES
        .iter()
        .find(|&&(alias, _)| alias == name)
        .map_or(name, |&(_, original)| original)
}

/// Looks an option up by level and name.
pub fn lookup(level: c_int, name: c_int) -> Option<&'static Opt> {
    SNAPSHOT.iter().find(|o| o.level == level && o.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_refused() {
        let escapes = [
            (
                libc::SOL_SOCKET,
                &[libc::SO_BINDTODEVICE, libc::SO_MARK, libc::SO_BINDTOIFINDEX][..],
            ),
            (
                libc::IPPROTO_IP,
                &[
                    libc::IP_TRANSPARENT,
                    libc::IP_FREEBIND,
                    libc::IP_UNICAST_IF,
                    libc::IP_MULTICAST_IF,
                ],
            ),
            (
                libc::IPPROTO_IPV6,
                &[
                    libc::IPV6_TRANSPARENT,
                    libc::IPV6_FREEBIND,
                    libc::IPV6_UNICAST_IF,
                    libc::IPV6_MULTICAST_IF,
                    libc::IPV6_PKTINFO,
                ],
            ),
        ];
        for (l, names) in escapes {
            for &n in names {
                assert_eq!(lookup(l, n).unwrap().class, Class::Refuse, "{l} {n}");
            }
        }
        // SOL_IP escapes count on AF_INET6 sockets too.
        for o in SNAPSHOT.iter().filter(|o| o.class == Class::Refuse) {
            assert!(o.applies(libc::AF_INET6, libc::SOCK_STREAM), "{}", o.label);
        }
    }

    #[test]
    fn aliases_name_the_original() {
        assert_eq!(canonical(libc::SOL_SOCKET, 33), libc::SO_RCVBUF);
        assert_eq!(
            canonical(libc::SOL_SOCKET, libc::SO_RCVBUF),
            libc::SO_RCVBUF
        );
        assert_eq!(canonical(libc::IPPROTO_IP, 33), 33);
    }

    #[test]
    fn values_fit_the_wire() {
        for o in SNAPSHOT {
            assert!(
                o.kind.size() <= crate::proto::broker::OPT_VALUE_MAX,
                "{}",
                o.label
            );
        }
        assert!(SNAPSHOT.len() <= crate::proto::broker::MAX_OPTS);
    }
}
