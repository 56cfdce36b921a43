//! `docker-ns-exec CONTAINER COMMAND [ARGS...]`: runs a host command inside
//! the network namespace of a running Docker container, every other
//! namespace (mounts, pids, users) staying the host's.
//!
//! This is how endpoints are defined for a container: `ip graft` must run in
//! the namespace whose endpoint table it edits, but it needs the host's files
//! (graftd's control socket, the `ip-graft` binary), which the container does
//! not have. `docker-ns-exec net1 ip graft add ep-in4 …` gives it both.
//!
//! It asks `docker inspect` for the container's init pid, opens
//! `/proc/PID/ns/net`, checks with a second inspect that the pid still
//! belongs to the running container (a pid can be reused), `setns`es into it
//! and execs the command (looked up on PATH).
//!
//! Exit status: 2 usage error; 1 the container is unknown, stopped, or its
//! namespace cannot be entered; 126/127 the command cannot be run; otherwise
//! the command's own.
#![forbid(unsafe_code)]

mod inspect;
mod netns;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: docker-ns-exec CONTAINER COMMAND [ARGS...]";

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("docker-ns-exec: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if argv.first().is_some_and(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if argv.first().is_some_and(|a| a == "--") {
        argv.remove(0);
    }
    let container = match argv.first().map(|c| c.to_str()) {
        None => {
            eprintln!("docker-ns-exec: no container given\n{USAGE}");
            return ExitCode::from(2);
        }
        Some(None) => return fail(2, "container name is not valid UTF-8"),
        // Docker names and ids never start with '-': this is a mistyped option.
        Some(Some(c)) if c.starts_with('-') => {
            eprintln!("docker-ns-exec: unknown option \"{c}\"\n{USAGE}");
            return ExitCode::from(2);
        }
        Some(Some(c)) => c.to_owned(),
    };
    if argv.len() < 2 {
        eprintln!("docker-ns-exec: no command given\n{USAGE}");
        return ExitCode::from(2);
    }
    run(&container, &argv[1], &argv[2..])
}

fn run(container: &str, prog: &OsString, args: &[OsString]) -> ExitCode {
    let pid = match inspect::container_pid(container) {
        Ok(p) => p,
        Err(e) => return fail(1, e),
    };
    let ns = match netns::open(pid) {
        Ok(f) => f,
        Err(e) => return fail(1, e),
    };
    // The namespace is pinned now; make sure it was the container's and not
    // that of a process that reused the pid after the container stopped.
    match inspect::container_pid(container) {
        Ok(again) if again == pid => {}
        Ok(_) => {
            return fail(
                1,
                format!("container {container} restarted meanwhile; try again"),
            )
        }
        Err(e) => return fail(1, e),
    }
    if let Err(e) = netns::enter(&ns, pid) {
        return fail(1, e);
    }
    drop(ns);
    let err = Command::new(prog).args(args).exec();
    let code = if err.kind() == std::io::ErrorKind::PermissionDenied {
        126
    } else {
        127
    };
    let text = err.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    fail(
        code,
        format!("cannot run {}: {text}", prog.to_string_lossy()),
    )
}
