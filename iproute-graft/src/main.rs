//! `ip-graft`: the `ip graft` command of graft, with AF_GRAFT's iproute2
//! grammar and output.
//!
//! `ip graft add|del|show|help` defines, removes and lists graft endpoints in
//! the network namespace the command runs in; `ip graft rules` shows, sets
//! and flushes the namespace's mapping rules (what `graft -- CMD` without
//! flags runs with). The command parses and checks
//! the whole line first (one line on stderr and exit status 2 for any
//! mistake), then sends one JSON request to graftd over its root-only
//! `SOCK_SEQPACKET` control socket, passing its own network namespace (and, for
//! `add … netns NS`, the target namespace) as file descriptors, and prints
//! graftd's answer as iproute2 would (`-j` JSON, `-s` counters).
//!
//! The `ip` wrapper script next to this crate runs `ip-graft` for `ip graft …`
//! (passing every word after `ip`, so the global options come first and the
//! `graft` object word is accepted and skipped) and the system `ip` otherwise.
#![forbid(unsafe_code)]

mod del;
mod help;
mod rules;
mod show;

use iproute_graft::{add, args, client, netns};

use std::io::Write;
use std::os::fd::AsFd;

use args::{matches, usage, GlobalOpts, Usage};
use graft_core::EndpointName;

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Add(add::AddCmd),
    Del(EndpointName),
    Show(Option<EndpointName>),
    Rules(rules::RulesCmd),
    Help,
    Version,
}

/// Parses everything after the program name.
fn parse(argv: &[String]) -> Result<(GlobalOpts, Cmd), Usage> {
    let (opts, rest) = args::parse_global(argv)?;
    if opts.help {
        return Ok((opts, Cmd::Help));
    }
    if opts.version {
        return Ok((opts, Cmd::Version));
    }
    let Some((word, tail)) = rest.split_first() else {
        return Ok((opts, Cmd::Show(None)));
    };
    let w = word.as_str();
    let cmd = if matches(w, "add") {
        Cmd::Add(add::parse(tail)?)
    } else if matches(w, "delete") {
        Cmd::Del(del::parse(tail)?)
    } else if matches(w, "show") || matches(w, "list") || w == "ls" || w == "lst" {
        Cmd::Show(show::parse(tail)?)
    } else if matches(w, "rules") {
        Cmd::Rules(rules::parse(tail)?)
    } else if matches(w, "help") {
        Cmd::Help
    } else {
        return Err(usage!("Command \"{w}\" is unknown, try \"ip graft help\"."));
    };
    Ok((opts, cmd))
}

fn run(argv: &[String]) -> anyhow::Result<()> {
    let (opts, cmd) = parse(argv)?;
    let control = client::control_path();
    let out = match cmd {
        Cmd::Help => help::HELP.to_owned(),
        Cmd::Version => format!("ip-graft, graft-{}\n", env!("CARGO_PKG_VERSION")),
        cmd => {
            if let Some(ns) = &opts.netns {
                enter(ns)?;
            }
            match cmd {
                Cmd::Add(a) => add::run(a, &control).map(|()| String::new())?,
                Cmd::Del(n) => del::run(n, &control).map(|()| String::new())?,
                Cmd::Show(n) => show::run(n, &opts, &control)?,
                Cmd::Rules(r) => rules::run(r, &opts, &control)?,
                Cmd::Help | Cmd::Version => String::new(),
            }
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| anyhow::anyhow!("cannot write to stdout: {}", netns::desc(&e)))
}

/// `-n NETNS`: this process is single-threaded here, so moving it into the
/// namespace moves everything it does afterwards, `/proc/self/ns/net` included.
fn enter(ns: &str) -> anyhow::Result<()> {
    let fd = netns::open(ns)?;
    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| anyhow::anyhow!("cannot enter netns \"{ns}\": {}", e.desc()))?;
    Ok(())
}

/// The exit status for an error: 2 for bad input (and graftd's refusals), 1
/// for everything else.
fn exit_code(e: &anyhow::Error) -> i32 {
    if e.is::<Usage>() || e.is::<netns::NetnsError>() {
        2
    } else if let Some(c) = e.downcast_ref::<client::ClientError>() {
        c.exit_code()
    } else {
        1
    }
}

/// Our own errors carry their full line; anything else gets the prefix.
fn message(e: &anyhow::Error) -> String {
    if e.is::<Usage>() || e.is::<netns::NetnsError>() || e.is::<client::ClientError>() {
        e.to_string()
    } else {
        format!("Error: {e:#}")
    }
}

fn main() {
    let argv: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let result = match argv {
        Ok(argv) => run(&argv),
        Err(bad) => Err(usage!(
            "Error: argument {:?} is not valid UTF-8",
            bad.to_string_lossy()
        )
        .into()),
    };
    if let Err(e) = result {
        eprintln!("{}", message(&e));
        std::process::exit(exit_code(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<(GlobalOpts, Cmd), String> {
        crate::args::parse_typed(parse, s)
    }

    #[test]
    fn commands_and_abbreviations() {
        assert_eq!(p("").unwrap().1, Cmd::Show(None));
        assert_eq!(p("graft").unwrap().1, Cmd::Show(None));
        assert_eq!(p("-s -j graft").unwrap().1, Cmd::Show(None));
        for w in ["show", "sh", "s", "list", "l", "ls", "lst"] {
            assert_eq!(
                p(&format!("gr {w} ep")).unwrap().1,
                Cmd::Show(Some(EndpointName::new("ep").unwrap())),
                "{w}"
            );
        }
        for w in ["del", "d", "delete"] {
            assert_eq!(
                p(&format!("{w} ep")).unwrap().1,
                Cmd::Del(EndpointName::new("ep").unwrap())
            );
        }
        for w in ["help", "h", "he"] {
            assert_eq!(p(w).unwrap().1, Cmd::Help);
        }
        assert_eq!(p("-help").unwrap().1, Cmd::Help);
        assert_eq!(p("-V").unwrap().1, Cmd::Version);
        assert!(matches!(
            p("g a ep-in4 type ipv4 addr 127.0.0.1 port 8080")
                .unwrap()
                .1,
            Cmd::Add(_)
        ));
    }

    #[test]
    fn unknown_command() {
        for (input, want) in [
            (
                "frob",
                "Command \"frob\" is unknown, try \"ip graft help\".",
            ),
            (
                "graft link",
                "Command \"link\" is unknown, try \"ip graft help\".",
            ),
        ] {
            assert_eq!(p(input).unwrap_err(), want, "{input}");
        }
    }

    #[test]
    fn exit_codes() {
        let u: anyhow::Error = usage!("x").into();
        assert_eq!(exit_code(&u), 2);
        let g: anyhow::Error = client::ClientError::Graftd {
            errno: 17,
            message: "m".into(),
        }
        .into();
        assert_eq!(exit_code(&g), 2);
        assert_eq!(message(&g), "Error: graftd: m");
        let n: anyhow::Error = client::ClientError::NotRunning("/x".into()).into();
        assert_eq!(exit_code(&n), 1);
        let other = anyhow::anyhow!("boom");
        assert_eq!(exit_code(&other), 1);
        assert_eq!(message(&other), "Error: boom");
    }
}
