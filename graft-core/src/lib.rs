//! `graft-core`: the model every graft component shares.
//!
//! graft hands a containerized program sockets that live in the host's network
//! namespace. Four programs cooperate — the daemon `graftd`, the `ip graft`
//! command, the preload library `libgraft-convert` and the `graft` launcher — and
//! this crate is the vocabulary they agree on:
//!
//! * [`call`]: the socket calls graft intercepts, their numbers and names.
//! * [`name`]: endpoint names (at most 15 bytes, as in AF_GRAFT).
//! * [`endpoint`]: what an endpoint is (an IPv4/IPv6 address and port, or a unix
//!   path) and how `ip graft` spells it.
//! * [`rules`]: the ingress (`-i ADDR:PORT[-PORT]=EP`) and egress
//!   (`-e PREFIX/LEN=EP`, `-x PREFIX/LEN`) mapping rules, their parser and matcher.
//! * [`nsrules`]: a namespace's own rules as graftd keeps them and hands them
//!   to `graft -- CMD` (run without `-i/-e/-x`).
//! * [`sockaddr`]: raw AF_INET/AF_INET6 socket addresses.
//! * [`sockopt`]: which socket options a grafted socket carries over from the
//!   application's socket, and which ones graftd refuses because they would let a
//!   container escape the endpoint it was given.
//! * [`exec`]: the exit status and line of a launcher whose command cannot run.
//! * [`le`]: little-endian fields of binary records.
//! * [`mountinfo`]: reading `/proc/self/mountinfo` fields.
//! * [`proto`]: the two wire protocols: `control` (JSON over graftd's root-only
//!   filesystem socket) and `broker` (fixed-size binary records over the
//!   per-namespace abstract socket, parseable without allocation).
//!
//! Nothing here performs I/O policy; the crate only defines and validates.

pub mod call;
pub mod endpoint;
pub mod exec;
pub mod fds;
pub mod le;
pub mod mountinfo;
pub mod name;
pub mod netns;
pub mod nsrules;
pub mod proto;
pub mod rules;
pub mod sockaddr;
pub mod sockopt;

pub use endpoint::{EndpointAddr, EndpointSpec};
pub use name::EndpointName;
pub use netns::NetnsId;

/// Where graftd listens for `ip graft` requests unless told otherwise.
pub const DEFAULT_CONTROL_PATH: &str = "/run/graft/graftd.sock";
/// Environment variable overriding [`DEFAULT_CONTROL_PATH`] for every client.
pub const ENV_CONTROL: &str = "GRAFT_CONTROL";
/// Abstract unix socket name (without the leading NUL) of the broker that graftd
/// opens inside every network namespace that has endpoints.
pub const DEFAULT_BROKER_NAME: &str = "graft/broker";
/// Environment variable overriding [`DEFAULT_BROKER_NAME`] (tests run several
/// daemons side by side).
pub const ENV_BROKER: &str = "GRAFT_BROKER";
/// Longest broker name: an abstract socket's name fills `sun_path` (108
/// bytes) after its leading NUL.
pub const BROKER_NAME_MAX: usize = 107;

/// Whether `name` can be a broker's abstract socket name: 1 to
/// [`BROKER_NAME_MAX`] bytes, no NUL. The error is the reason, for the caller
/// to put after the name.
pub fn check_broker_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > BROKER_NAME_MAX || name.contains('\0') {
        Err("a broker name must be 1 to 107 bytes without NUL")
    } else {
        Ok(())
    }
}
/// Ingress rules for the preload library, as in AF_GRAFT's wrapper.
pub const ENV_INGRESS: &str = "GRAFT_INGRESS_CONVERT";
/// Egress rules for the preload library, as in AF_GRAFT's wrapper.
pub const ENV_EGRESS: &str = "GRAFT_EGRESS_CONVERT";
/// Egress prefixes that are never grafted.
pub const ENV_EGRESS_EXCLUDE: &str = "GRAFT_EGRESS_EXCLUDE";
/// `1` makes the preload library print one line per grafting decision.
pub const ENV_VERBOSE: &str = "GRAFT_VERBOSE";
/// `GRAFT_POOL=0` turns off the preload library's per-process pool of
/// pre-made egress sockets (on by default).
pub const ENV_POOL: &str = "GRAFT_POOL";
/// Milliseconds the preload library waits for an unreachable broker (graftd
/// restarting) before failing a call closed; `0` fails at once.
pub const ENV_WAIT: &str = "GRAFT_WAIT_MS";
/// Default of [`ENV_WAIT`]: a supervised restart takes well under a second.
pub const DEFAULT_WAIT_MS: u32 = 1000;
/// Largest [`ENV_WAIT`] accepted.
pub const MAX_WAIT_MS: u32 = 60_000;
/// `host` (default, as AF_GRAFT) or `app`: what `getsockname()` reports on an
/// ingress-grafted socket.
pub const ENV_GETSOCKNAME: &str = "GRAFT_GETSOCKNAME";
/// Set by the launcher for a program whose seccomp filter graftd serves:
/// `PID-START:FD`, the process graft started (pid and start time) and the
/// descriptor holding its copy of the listener. Children inherit it, so a
/// restarted graftd finds the listener in one of them when that process is
/// gone (graftd's `adopt` module). A `graft` run inside a grafted program
/// adds its own, comma-separated: every filter stays, and so does every
/// listener copy.
pub const ENV_SECCOMP_LISTENER: &str = "GRAFT_SECCOMP_LISTENER";

/// Where libgraft-convert maps its system-call trampoline (one page, with
/// `MAP_FIXED_NOREPLACE`): the seccomp filter `graft` installs in preload
/// mode lets calls made from this page pass in the kernel, so the
/// library's own (already decided) calls never wait for graftd, while
/// glibc's internal ones (its resolver) and raw `syscall()` are trapped.
/// An address no loader, allocator or Go runtime picks on x86_64.
pub const TRAMPOLINE_PAGE: u64 = 0x4772_6166_0000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_names_up_to_the_abstract_socket_limit() {
        assert_eq!(check_broker_name(DEFAULT_BROKER_NAME), Ok(()));
        assert_eq!(check_broker_name(&"b".repeat(BROKER_NAME_MAX)), Ok(()));
        let err = check_broker_name(&"b".repeat(BROKER_NAME_MAX + 1)).unwrap_err();
        assert!(err.contains(&BROKER_NAME_MAX.to_string()), "{err}");
        assert!(check_broker_name("").is_err());
        assert!(check_broker_name("a\0b").is_err());
    }
}
