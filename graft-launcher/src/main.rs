//! `graft`: runs an unmodified program with its sockets grafted onto host
//! endpoints.
//!
//! ```text
//! graft [-v] [-n|--no-check] [-i ADDR:PORT[-PORT]=EP]... [-e PREFIX/LEN=EP]...
//!       [-x PREFIX/LEN]... [-g host|app] [--mode auto|preload|seccomp]
//!       [--wait SECS] [--] COMMAND [ARGS...]
//! ```
//!
//! The launcher does no grafting itself. It validates the mapping rules, puts
//! them in the variables libgraft-convert reads (`GRAFT_INGRESS_CONVERT`,
//! `GRAFT_EGRESS_CONVERT`, `GRAFT_EGRESS_EXCLUDE`, `GRAFT_VERBOSE`,
//! `GRAFT_GETSOCKNAME`, as AF_GRAFT's wrapper did; rules already in those
//! variables are kept after the new ones), prepends the library to
//! `LD_PRELOAD`, and replaces itself with the command. Before that, unless
//! `--no-check`, it asks graftd's broker in this network namespace whether
//! every named endpoint exists, so a missing endpoint is reported at start
//! rather than at the program's first `bind()` or `connect()`. It also warns
//! when the program cannot be preloaded (static or setuid).
//!
//! Programs `LD_PRELOAD` cannot reach (static, or not linked with glibc:
//! Go, musl, busybox) run in seccomp mode instead (`--mode auto`, the
//! default, picks per program; see [`seccomp`]): the launcher installs a
//! seccomp user-notification filter and hands its listener to graftd, which
//! grafts the trapped calls with the same rules. The launcher is built
//! statically so it runs in any image.
//!
//! Without `-i`, `-e` and `-x` it takes the rules graftd keeps for this
//! network namespace, when there are any (see [`ns_rules`]).
//!
//! Exit status: 2 for a usage error or a bad mapping, 1 when the check fails
//! or the library is not found, 126/127 when the command cannot be run
//! (permission / anything else); otherwise the command's own, since `graft`
//! becomes the command.
#![forbid(unsafe_code)]

mod args;
mod check;
mod elf;
mod library;
mod ns_rules;
mod seccomp;

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use args::{Args, Parsed};

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("graft: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("graft {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("graft: {e}");
            if e.wants_usage() {
                eprintln!("{}", args::USAGE);
            }
            return ExitCode::from(2);
        }
    };
    run(args)
}

/// The program a command word names, as exec would find it.
fn resolve(cmd: &OsString) -> Option<PathBuf> {
    let p = Path::new(cmd);
    if p.components().count() > 1 || cmd.to_string_lossy().contains('/') {
        return Some(p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(p)).find(|c| {
        c.metadata()
            .is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
    })
}

/// One warning line when LD_PRELOAD cannot take effect for `prog`.
fn warn_if_unpreloadable(prog: &Path) {
    let shown = prog.display();
    if let Ok(meta) = prog.metadata() {
        // The loader runs set-id programs in secure mode (and ignores a
        // LD_PRELOAD path) only when the ids really change.
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        if (meta.mode() & 0o4000 != 0 && meta.uid() != uid)
            || (meta.mode() & 0o2000 != 0 && meta.gid() != gid)
        {
            eprintln!(
                "graft: warning: {shown} is setuid/setgid: the dynamic loader ignores \
                 LD_PRELOAD for it, its sockets will not be grafted"
            );
            return;
        }
    }
    let static_prog = match elf::inspect(prog) {
        Ok(elf::Linkage::Static) => Some(prog.to_path_buf()),
        Ok(elf::Linkage::Script(interp, inner)) if *inner == elf::Linkage::Static => Some(interp),
        _ => None,
    };
    if let Some(p) = static_prog {
        eprintln!(
            "graft: warning: {} is statically linked: LD_PRELOAD cannot work there, \
             its sockets will not be grafted",
            p.display()
        );
    }
}

fn run(args: Args) -> ExitCode {
    let broker = check::broker_name(std::env::var(graft_core::ENV_BROKER).ok());
    let args = match ns_rules::fill(args, &broker, &|k| std::env::var(k).ok()) {
        Ok(a) => a,
        Err(e) => return fail(1, e),
    };
    let env = match args.rule_env(|k| std::env::var(k).ok()) {
        Ok(e) => e,
        Err(e) => return fail(2, e),
    };
    let cmd_word = &args.command[0];
    let prog = resolve(cmd_word);
    let (mode, why) = seccomp::choose(args.mode, prog.as_deref());
    let lib = if mode == seccomp::Chosen::Preload {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        match library::find(std::env::var_os(library::ENV_LIBRARY), &exe) {
            Ok(l) => Some(l),
            Err(e) => return fail(1, e),
        }
    } else {
        None
    };
    // `--wait`: a container's namespace exists only once it runs, so its
    // endpoints (and graftd's broker there) may be added after the launcher
    // started: keep asking, for a bounded time.
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(args.wait_secs.into());
    if args.check || args.wait_secs > 0 {
        loop {
            match check::check(&broker, &env.rules, args.verbose) {
                Ok(()) => break,
                Err(check::CheckError::Unreachable { .. } | check::CheckError::Missing { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) if args.check => return fail(1, e),
                Err(_) => break,
            }
        }
    }
    if let (Some(prog), None) = (&prog, &lib) {
        if args.verbose {
            eprintln!("graft: {}: seccomp mode ({why})", prog.display());
        }
    } else if let Some(prog) = &prog {
        warn_if_unpreloadable(prog);
    }

    let mut cmd = Command::new(cmd_word);
    cmd.args(&args.command[1..]);
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    if args.verbose {
        cmd.env(graft_core::ENV_VERBOSE, "1");
    }
    if let Some(g) = args.getsockname {
        cmd.env(graft_core::ENV_GETSOCKNAME, g.as_str());
    }
    if args.verbose {
        for (k, v) in &env.vars {
            eprintln!("graft: {k}={v}");
        }
    }
    if let Some(lib) = &lib {
        let preload = library::ld_preload(lib, std::env::var_os("LD_PRELOAD").as_deref());
        cmd.env("LD_PRELOAD", &preload);
        if args.verbose {
            eprintln!("graft: LD_PRELOAD={}", preload.to_string_lossy());
        }
    }
    if !env.rules.is_empty() {
        let hint = env
            .rules
            .endpoints()
            .first()
            .map(|e| format!("{e} type ipv4|ipv6"))
            .unwrap_or_default();
        let allow = lib.as_ref().map(|_| graft_core::TRAMPOLINE_PAGE);
        // Last step before exec: from here on the launcher's own
        // bind/connect/sendmsg would be trapped.
        match seccomp::attach(&broker, &env.rules, args.verbose, &hint, allow) {
            Ok(a) => {
                cmd.env(graft_core::ENV_SECCOMP_LISTENER, &a.env);
                if !a.killable && args.verbose {
                    eprintln!(
                        "graft: this kernel has no SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV \
                         (Linux 5.19): a signal can interrupt a trapped call"
                    );
                }
            }
            // Preload mode without a working graftd: the library fails each
            // grafted call closed with its own line, as it always did. The
            // calls it cannot see (glibc's resolver) are not grafted: they
            // stay local when no filter could be installed, and fail with
            // ENOSYS when the filter is in place but nobody serves it.
            Err(e) if lib.is_some() => {
                if args.verbose {
                    eprintln!("graft: {e}: glibc's own resolver calls will not be grafted");
                }
            }
            Err(e) => return fail(1, e),
        }
    }
    // exec only returns on failure.
    let (code, msg) = graft_core::exec::failure(cmd_word, &cmd.exec());
    fail(code, msg)
}
