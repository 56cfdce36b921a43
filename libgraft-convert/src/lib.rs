//! `libgraft-convert`: the preload library (`LD_PRELOAD=libgraft_convert.so`,
//! normally set by the `graft` launcher) that grafts an unmodified program's
//! sockets onto host sockets handed out by graftd.
//!
//! # What it does
//!
//! It shadows `socket`, `setsockopt`, `bind`, `listen`, `connect`, `sendto`,
//! `sendmsg`, `sendmmsg`, `getsockname`, `getpeername`, `close`, `dup`, `dup2`, `dup3`,
//! `fcntl`/`fcntl64` (`F_DUPFD`, `F_DUPFD_CLOEXEC`), `accept` and `accept4`.
//! With no rules in the environment every call is one relaxed load away from
//! the real function.
//!
//! * **Ingress** (`GRAFT_INGRESS_CONVERT`, `-i ADDR:PORT[-PORT]=EP`): a
//!   `bind()` to a matching address and port (not 0) is replaced by a host
//!   socket graftd creates and binds to the endpoint; `bind()` then returns 0
//!   without touching the container's stack. A dual-stack `[::]` bind
//!   (IPV6_V6ONLY off) with no `::` rule takes the `0.0.0.0` rule, since it
//!   serves IPv4 too (iperf3 binds `[::]` by default). One (a stream socket) that
//!   matches both a `::` and a `0.0.0.0` rule asks graftd for one listener
//!   answering on both endpoints (`SocketDual`: bound to the IPv4 endpoint
//!   as `[::ffff:A4]:P4`, IPv6 connections steered to it by graft-ebpf's
//!   sk_lookup); when graftd cannot, it says so in one line and grafts onto
//!   the `::` rule's endpoint alone. A `bind()` to port 0 is
//!   what clients do, so it is done locally and decided later: at `listen()`
//!   (a server: grafted if a rule for that address covers port 0) or at the
//!   first send/connect (egress). A `listen()` on an unbound socket counts as
//!   a bind to the wildcard, port 0.
//! * **Egress** (`GRAFT_EGRESS_CONVERT`, `-e PREFIX/LEN=EP`; exclusions
//!   `GRAFT_EGRESS_EXCLUDE`, `-x PREFIX/LEN`): the first `connect()`,
//!   `sendto()`, `sendmsg()` or `sendmmsg()` with a destination, on a socket
//!   not bound by the application (or bound to port 0), is matched by longest
//!   prefix (v4-mapped IPv6 destinations match IPv4 rules). A match is grafted
//!   before the real call runs on the new socket, so a non-blocking connect
//!   still returns EINPROGRESS. Excluded and unmatched sockets are left alone
//!   for good.
//! * **Grafting**: a broker request (family, type, protocol, purpose, and the
//!   options the application set) goes to graftd's abstract socket
//!   `"\0" + $GRAFT_BROKER` (default `graft/broker`) in the current network
//!   namespace; the reply carries the host socket, which is `dup3`'d over the
//!   application's descriptor keeping O_NONBLOCK and FD_CLOEXEC.
//! * **Egress socket pool** ([`pool`]; `GRAFT_POOL=0` turns it off, default
//!   on): an egress graft of a socket whose whole history the library saw
//!   and that carries no option is served from a per-process pool of
//!   sockets graftd made in advance, keyed by (network namespace,
//!   endpoint, family, type, protocol); an empty pool asks with one
//!   `SocketBatch` request, uses one socket and keeps the rest (graftd sends
//!   8 on a process's first batch, then 16, then 32 per batch; from the
//!   third on, the next batch is asked ahead while 8 are left). At most 4
//!   keys of 64 sockets,
//!   close-on-exec, at high descriptor numbers the application never sees
//!   (the pooled socket is `dup3`'d over its descriptor like a fresh one);
//!   a busy pool (another thread, a signal handler) falls back to one
//!   request, never waits. A fork()ed child closes its inherited copies at
//!   once. Consequences: without graft-ebpf's bind guard (`graftd
//!   --no-ebpf`) each pooled socket holds an ephemeral port on the
//!   endpoint's address from the moment it is made (with it, TCP egress
//!   sockets get their port at connect), and an endpoint removed
//!   with `ip graft del` can still hand out up to 63 pooled sockets per
//!   process until they are used (with graft-ebpf, deleting an endpoint
//!   already makes its sockets refused on connect). Sockets with options,
//!   ingress sockets and sockets of unknown history always take a request.
//! * **Grafting at socket()** ([`early`]): when every destination of a
//!   family goes to one endpoint (`-e 0.0.0.0/0=EP` or `-e ::/0=EP` and no
//!   other egress rule of that family) and the pool holds a socket for it,
//!   a new TCP socket is that host socket from the start, at the lowest free
//!   descriptor number with the flags socket() was given: the container
//!   socket a connect-time graft makes and throws away is never made. Its
//!   connect() to a destination the rules send to that endpoint just
//!   connects; anything that would tell the two apart first puts a
//!   container socket (with the options set so far) in its place and
//!   carries on as if the socket had been one all along: a bind(), a
//!   listen(), a connect() the rules decide otherwise, an option that is
//!   not carried over.
//! * **Which options**: for a socket our `socket()` made, `setsockopt()`
//!   records (per descriptor, one bit per option of
//!   `graft_core::sockopt::SNAPSHOT`, only when the call succeeded) which
//!   options the application set, and the graft reads back just those, with
//!   no other system call (most clients set none). Escape options (SO_MARK,
//!   SO_BINDTODEVICE, ...) that are on are sent so graftd refuses them. A
//!   socket whose history the library did not see whole (inherited across
//!   exec, received over SCM_RIGHTS, duplicated before the graft, or made
//!   before a fork() that shares it with another process) is compared
//!   option by option with a fresh socket of the same kind instead, and
//!   every option that differs is sent. Not covered: a socket shared with
//!   a child made by vfork/posix_spawn/clone (no fork handlers run) or
//!   passed to another process over SCM_RIGHTS, which sets options on it
//!   before this process grafts it.
//! * **Fail closed**: when a matching socket cannot be grafted (no graftd, no
//!   such endpoint, an option or policy refused) the call fails and one line
//!   on stderr names the call, the address, the endpoint and the fix. errno:
//!   EADDRNOTAVAIL for bind/listen and ENETUNREACH for connect/sends when graftd
//!   or the endpoint is missing, EPERM for a refused option, EAFNOSUPPORT for
//!   a family mismatch, ETIMEDOUT when graftd does not answer within 5 s,
//!   EMFILE when the host socket (or the fresh socket used to tell which
//!   options an inherited socket has) does not fit under the descriptor limit,
//!   otherwise graftd's errno (the whole table, and every line's text:
//!   [`fail`]). The socket is never left on the container's
//!   stack. A malformed environment makes every AF_INET/AF_INET6 `bind()` and
//!   `connect()` fail with EINVAL and prints one line per process.
//! * **`type unix` endpoints**: graftd answers an AF_INET/AF_INET6 stream
//!   socket mapped onto one with a unix stream socket, bound at the path
//!   (ingress) or already connected to it (egress: `connect()` then
//!   returns 0 without running). The program still believes it holds a
//!   TCP socket: `getsockname` answers the address it bound (or, for a
//!   client, the loopback address, port 0), `getpeername` and `accept`
//!   answer the loopback address, port 0, for a connection accepted on
//!   such a listener (the peer is a local process), and the destination it
//!   asked for on a client; `setsockopt` at the TCP, IP and IPv6 levels
//!   (TCP_NODELAY, keepalive timers, ...) succeeds without doing anything,
//!   on the listener, on accepted connections (tracked) and on clients.
//!   Datagram sockets are refused (ESOCKTNOSUPPORT). Not covered: a
//!   `sendto()` with a destination on such a socket (TCP Fast Open) fails
//!   with EISCONN, and `getsockopt` answers for the unix socket.
//! * **getsockname**: `GRAFT_GETSOCKNAME=host` (default, as AF_GRAFT) reports
//!   the host address the socket really has; `app` reports, for sockets
//!   grafted on ingress, the address the application bound (with the real port
//!   if it asked for port 0). Egress sockets always report the host address.
//! * **Spliced sockets** (graftd splices grafted pairs by default): the kernel's sockmap receive
//!   path fails a blocking receive with EAGAIN after any wake-up without
//!   data (a signal, the ACK of the socket's own FIN, another thread's send
//!   freeing memory). The receives (`read`, `readv`, `recv`, `recvfrom`,
//!   `recvmsg`, `recvmmsg` without a timeout, and the fortified
//!   `__read_chk`, `__recv_chk`, `__recvfrom_chk`) repeat such a receive on
//!   a blocking socket without `SO_RCVTIMEO`, as TCP goes on waiting, or
//!   fail it with EINTR when a signal handler without `SA_RESTART` is
//!   installed, as TCP would after such a signal. `fdopen` on a grafted or
//!   accepted TCP socket makes a stream whose reads go through that
//!   `read` ([`stdio`]: libc's stdio reads through an internal `read` no
//!   preload library sees). TCP connections inherited across exec are
//!   recorded as connected in the constructor (one listing of
//!   `/proc/self/fd`), and those received over SCM_RIGHTS by `recvmsg`, so
//!   the same holds for an inetd-style child or a worker process.
//!   `splice` from such a socket into a pipe is a receive and a write (the
//!   kernel's TCP splice never sees what a spliced peer handed over), and a
//!   receive with `MSG_WAITALL` that came back short is continued (the
//!   sockmap receive returns what is queued).
//! * `GRAFT_VERBOSE=1` (`graft -v`) prints one line per decision:
//!   `graft: pid 123 fd 5 bind 0.0.0.0:5201 -> ep-in4 (host 127.0.0.1:8080)`,
//!   `graft: pid 123 fd 6 connect 127.0.0.1:9000 -> not grafted (excluded)`.
//!
//! # How it stays out of the way
//!
//! * Real functions are resolved once in a constructor (`dlsym(RTLD_NEXT)`)
//!   into atomics; before that, calls go straight to `syscall(2)`. The library's
//!   own I/O uses raw system calls so it never re-enters itself.
//! * Per-descriptor state lives in a lock-free two-level table ([`table`]):
//!   no fixed descriptor limit, pages from mmap(2), never the allocator. A send
//!   with no destination costs nothing; one on a decided socket costs one
//!   table load. Descriptors received over SCM_RIGHTS or inherited across exec
//!   start unknown and are classified on first use (type, family, bound or
//!   connected). `dup`/`dup2`/`dup3`/`F_DUPFD` copy the state (and the option
//!   record, marked incomplete on both); `close` clears it. `setsockopt` on
//!   a decided socket costs one table load.
//!   The state belongs to a descriptor, not an open file description: grafting
//!   replaces the socket behind one descriptor number, and other duplicates
//!   made before the decision keep the original socket.
//! * errno is saved on entry and restored on success paths; no panic unwinds
//!   into C (decisions run under `catch_unwind`; a bug fails the call with EIO).
//! * Cached broker connections ([`broker`]: one shared, one the pool's):
//!   re-made after fork and when the socket being grafted belongs to
//!   another network namespace than the one the connection was made in
//!   (a thread that called setns(); the socket's netns cookie tells, one
//!   getsockopt per graft), guarded by a try-lock so concurrent threads and
//!   signal handlers never wait (they use a one-off connection), with
//!   send/receive timeouts.
//!   Decision paths use only system calls and stack buffers, so a signal
//!   handler that connects while its thread is mid-decision is still decided
//!   (never silently passed through); a thread-local guard only covers the
//!   constructor, whose dlsym and environment parsing may call back into us.
//! * Exec'd programs read the environment again in their own constructor.
//!
//! Statically linked programs (and Go programs making raw system calls)
//! cannot be intercepted by any preload library; the `graft` launcher warns.
//!
//! # Where things are
//!
//! [`interpose`] holds the exported functions (thin: errno saved and
//! restored in one place), [`decide`] the decisions, [`install`] the graft
//! (request, reply, `dup3`), [`fail`] the errno and the one line of every
//! failure, [`sys`] the real functions (one table line per hook) and the
//! raw system calls, [`table`] the per-descriptor state, [`broker`] and
//! [`pool`] the exchange with graftd, [`stdio`] the streams `fdopen` makes
//! on grafted sockets.
//!
//! Unsafe code lives in [`sys`] (the C boundary), [`table`] (mmap'd pages),
//! the configuration pointer in `config`, taking a pooled descriptor back in
//! [`pool`], the exported functions, and the streams of [`stdio`].

// Unit tests build without the exported functions (the test binary must not
// interpose on itself), which leaves the code they call unused there.
#![cfg_attr(test, allow(dead_code))]

use graft_core::sockaddr as addr;
mod broker;
mod config;
mod decide;
mod early;
mod fail;
mod install;
#[cfg(not(test))]
mod interpose;
mod log;
mod pool;
#[cfg(not(test))]
mod stdio;
mod sys;
mod table;
mod trampoline;
