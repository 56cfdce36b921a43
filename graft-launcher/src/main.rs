//! `graft`: runs an unmodified program with its sockets grafted onto host
//! endpoints.
//!
//! ```text
//! graft [-v] [-n|--no-check] [-i ADDR:PORT[-PORT]=EP]... [-e PREFIX/LEN=EP]...
//!       [-x PREFIX/LEN]... [-g host|app] [--] COMMAND [ARGS...]
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
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let lib = match library::find(std::env::var_os(library::ENV_LIBRARY), &exe) {
        Ok(l) => l,
        Err(e) => return fail(1, e),
    };
    if args.check {
        if let Err(e) = check::check(&broker, &env.rules, args.verbose) {
            return fail(1, e);
        }
    }
    let cmd_word = &args.command[0];
    if let Some(prog) = resolve(cmd_word) {
        warn_if_unpreloadable(&prog);
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
    let preload = library::ld_preload(&lib, std::env::var_os("LD_PRELOAD").as_deref());
    cmd.env("LD_PRELOAD", &preload);
    if args.verbose {
        for (k, v) in &env.vars {
            eprintln!("graft: {k}={v}");
        }
        eprintln!("graft: LD_PRELOAD={}", preload.to_string_lossy());
    }
    // exec only returns on failure.
    let err = cmd.exec();
    let code = if err.kind() == std::io::ErrorKind::PermissionDenied {
        126
    } else {
        127
    };
    let text = err.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    fail(
        code,
        format!("cannot run {}: {text}", cmd_word.to_string_lossy()),
    )
}
