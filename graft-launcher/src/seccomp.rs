//! seccomp mode: choosing the mode, and handing graftd a seccomp listener.
//!
//! The filter (from `graft-seccomp`) traps `bind`, `connect`, `sendto` with
//! an address, `sendmsg` and `sendmmsg`. It is installed on the launcher
//! itself, right before exec, so the program and every child inherit it.
//! Its listener goes to graftd over this namespace's broker in an
//! `Op::Attach` record together with the rules. From the moment the filter
//! is in place until graftd holds the listener, nobody would answer a
//! trapped call, so the launcher only uses `send`/`recv` on an already
//! connected socket then (the filter lets a `sendto` without address pass),
//! and graftd takes the listener with `pidfd_getfd` rather than SCM_RIGHTS
//! (`sendmsg` is trapped).
//!
//! The program keeps a copy of the listener too, at a descriptor above
//! [`HELD_FD_MIN`] that survives exec (graftd is told its number): the
//! filter then outlives a graftd crash or upgrade, a trapped call waits for
//! the next graftd instead of failing with ENOSYS, and that graftd takes the
//! listener again from the program (graftd's `adopt` module), or from a
//! child of it that inherited the descriptor and
//! [`graft_core::ENV_SECCOMP_LISTENER`], should the program itself be gone.
//!
//! In preload mode the filter is installed too (when graftd answers), to
//! catch what the library cannot see: glibc's internal resolver calls and
//! raw `syscall()`. The library makes its own calls from a trampoline page
//! at [`graft_core::TRAMPOLINE_PAGE`], which that filter lets pass, so the
//! preload fast path gains no round trip.

use std::os::fd::AsRawFd;
use std::path::Path;

use graft_core::proto::broker::{Attach, Op, Reason, ATTACH_VERBOSE, REQUEST_LEN};
use graft_core::rules::RuleSet;
use nix::fcntl::FcntlArg;

use crate::args::Mode;
use crate::check::{Broker, CheckError};
use crate::elf;

/// The way chosen for one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Preload,
    Seccomp,
}

/// Why `--mode auto` chose seccomp, for `-v`.
pub fn choose(mode: Mode, prog: Option<&Path>) -> (Chosen, &'static str) {
    match mode {
        Mode::Preload => (Chosen::Preload, "--mode preload"),
        Mode::Seccomp => (Chosen::Seccomp, "--mode seccomp"),
        Mode::Auto => {
            let Some(prog) = prog else {
                return (Chosen::Preload, "program not found");
            };
            // A script runs its interpreter: that is the program to look at.
            let target = match elf::inspect(prog) {
                Ok(elf::Linkage::Script(interp, _)) => interp,
                _ => prog.to_path_buf(),
            };
            match elf::inspect(&target) {
                Ok(elf::Linkage::Static) => (Chosen::Seccomp, "statically linked"),
                Ok(elf::Linkage::Dynamic) => match elf::interpreter(&target) {
                    Ok(Some(i)) if !elf::is_glibc_loader(&i) => {
                        (Chosen::Seccomp, "not linked with glibc")
                    }
                    _ => (Chosen::Preload, "dynamically linked with glibc"),
                },
                _ => (Chosen::Preload, "not an ELF file graft parses"),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("{0}")]
    Broker(#[from] CheckError),
    #[error("cannot install the seccomp filter: {0}")]
    Install(std::io::Error),
    #[error("too many rules for seccomp mode: {0}")]
    TooLong(graft_core::proto::broker::DecodeError),
    #[error("graftd refused the seccomp listener: {reason} ({err})")]
    Refused {
        reason: &'static str,
        err: nix::errno::Errno,
    },
}

/// Lowest descriptor the program's own copy of the listener may take: above
/// those programs and shells pick by number.
pub const HELD_FD_MIN: i32 = 100;

/// A listener graftd serves.
#[derive(Debug)]
pub struct Attached {
    /// Whether the kernel took `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`.
    pub killable: bool,
    /// The value of [`graft_core::ENV_SECCOMP_LISTENER`] for the program.
    pub env: String,
}

/// Installs the filter on this process and hands its listener to graftd.
/// `allow_page`: the preload library's trampoline, whose calls pass (preload
/// mode).
pub fn attach(
    broker: &str,
    rules: &RuleSet,
    verbose: bool,
    hint: &str,
    allow_page: Option<u64>,
) -> Result<Attached, SeccompError> {
    let b = Broker::connect_waiting(broker, hint, crate::check::wait_from_env())?;
    let (ingress, egress, exclude) = rules.to_env_values();
    let mut a = Attach {
        listener_fd: 0,
        flags: if verbose { ATTACH_VERBOSE } else { 0 },
        ingress,
        egress,
        exclude,
    };
    let mut rec = [0u8; REQUEST_LEN];
    // Checked before the filter exists, so a refusal leaves nothing behind.
    a.encode(&mut rec).map_err(SeccompError::TooLong)?;
    let (listener, killable) =
        graft_seccomp::filter::install(allow_page).map_err(SeccompError::Install)?;
    // Not close-on-exec: the program's copy (see the module doc). A limit
    // of open files at or below HELD_FD_MIN leaves any free number.
    let dup = |min| nix::fcntl::fcntl(listener.as_raw_fd(), FcntlArg::F_DUPFD(min));
    let held = dup(HELD_FD_MIN)
        .or_else(|_| dup(0))
        .map_err(|e| SeccompError::Install(e.into()))?;
    a.listener_fd = held;
    a.encode(&mut rec).map_err(SeccompError::TooLong)?;
    let reply = match b.exchange(&rec, Op::Attach) {
        Ok(r) => r,
        Err(e) => {
            let _ = nix::unistd::close(held);
            return Err(e.into());
        }
    };
    if reply.errno != 0 || reply.reason != Reason::None {
        let _ = nix::unistd::close(held);
        return Err(SeccompError::Refused {
            reason: reply.reason.describe(),
            err: nix::errno::Errno::from_raw(reply.errno),
        });
    }
    // graftd holds its own copy now and the program `held`; this one is
    // close-on-exec anyway.
    drop(listener);
    let me = std::process::id();
    let start = graft_seccomp::pidfd::start_time(me).unwrap_or(0);
    let inherited = std::env::var(graft_core::ENV_SECCOMP_LISTENER).ok();
    Ok(Attached {
        killable,
        env: listener_env(inherited.as_deref(), &format!("{me}-{start}:{held}")),
    })
}

/// The program's [`graft_core::ENV_SECCOMP_LISTENER`]: its own listener
/// added to those it inherits (a `graft` run inside a grafted program: the
/// outer filters stay, and so do their listener copies), comma-separated,
/// so graftd can find each of them again in a descendant.
fn listener_env(inherited: Option<&str>, own: &str) -> String {
    match inherited.filter(|v| !v.is_empty()) {
        Some(v) => format!("{v},{own}"),
        None => own.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nested_launcher_adds_its_listener_to_the_inherited_ones() {
        assert_eq!(listener_env(None, "7-99:100"), "7-99:100");
        assert_eq!(listener_env(Some(""), "7-99:100"), "7-99:100");
        assert_eq!(
            listener_env(Some("5-42:100,6-43:101"), "7-99:102"),
            "5-42:100,6-43:101,7-99:102"
        );
    }

    #[test]
    fn auto_mode_follows_the_program() {
        assert_eq!(
            choose(Mode::Auto, Some(Path::new("/bin/sh"))).0,
            Chosen::Preload
        );
        let ldconfig = Path::new("/sbin/ldconfig");
        if ldconfig.exists() {
            assert_eq!(choose(Mode::Auto, Some(ldconfig)).0, Chosen::Seccomp);
            assert_eq!(choose(Mode::Preload, Some(ldconfig)).0, Chosen::Preload);
        }
        assert_eq!(choose(Mode::Seccomp, None).0, Chosen::Seccomp);
        assert_eq!(choose(Mode::Auto, None).0, Chosen::Preload);
    }
}
