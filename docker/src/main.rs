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
//! Exit status: 2 usage error (one line); 1 the container is unknown,
//! stopped, or its namespace cannot be entered; 126/127 the command cannot be
//! run; otherwise the command's own.
#![forbid(unsafe_code)]

mod inspect;
mod netns;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use clap::error::ErrorKind;
use clap::Parser;

/// Runs a host command inside the network namespace of a running Docker
/// container (mounts, pids and users stay the host's).
#[derive(Debug, Parser)]
#[command(name = "docker-ns-exec", version)]
struct Cli {
    /// The container's name or id.
    #[arg(value_name = "CONTAINER")]
    container: String,
    /// The command and its arguments, looked up on the host's PATH; options
    /// after the container belong to the command.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("docker-ns-exec: {msg}");
    ExitCode::from(code)
}

/// clap's error as one line: its first paragraph (the message and any list
/// of missing arguments) joined, without the `error: ` prefix.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let words: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .flat_map(str::split_whitespace)
        .collect();
    let line = words.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{}", e.render());
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(2, format!("{} (--help shows the usage)", one_line(&e))),
    };
    let Some((prog, args)) = cli.command.split_first() else {
        return fail(2, "no command given (--help shows the usage)");
    };
    run(&cli.container, prog, args)
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
    let (code, msg) = graft_core::exec::failure(prog, &Command::new(prog).args(args).exec());
    fail(code, msg)
}
