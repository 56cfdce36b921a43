//! `graft-bench`: the measuring tools driven by `bench/run`.
//!
//! Each subcommand is one small, bounded loop that prints a single line of
//! `key=value` pairs on stdout for the harness to parse:
//!
//! - `server`: TCP echo server (thread per connection). `--once` answers one
//!   message and closes first, so TIME_WAIT stays on the server side.
//! - `latency`: 64-byte ping-pong over one TCP connection (p50/p99/mean µs).
//! - `churn`: one new TCP connection per request (conn/s, p50/p99 µs).
//! - `relay`: a docker-proxy-like userland relay: every accepted connection
//!   gets its own thread, which connects upstream and splices both ways.
//! - `sendcost`: ns per `sendto()` on an already-decided UDP socket (run with
//!   and without LD_PRELOAD to get the preload library's cost per call).
//! - `sockcost`: µs per new UDP socket whose first `sendto()` goes out
//!   (under `graft -e …` each one is a broker round trip).
//!
//! Every loop is bounded by a count and a wall-clock limit.

mod args;
mod churn;
mod latency;
mod relay;
mod sendcost;
mod server;
mod stats;

use std::process::ExitCode;

const USAGE: &str =
    "usage: graft-bench { server | latency | churn | relay | sendcost | sockcost } [--key value]…
  server   --listen ADDR:PORT [--once] [--size N] [--secs LIFETIME]
  latency  --connect ADDR:PORT [--size 64] [--count N] [--secs S] [--warmup N]
  churn    --connect ADDR:PORT [--size 64] [--count N] [--secs S]
  relay    --listen ADDR:PORT --upstream ADDR:PORT [--secs LIFETIME]
  sendcost --dest ADDR:PORT [--count N] [--oob]
  sockcost --dest ADDR:PORT [--count N] [--secs S]";

type Run = fn(&args::Args) -> anyhow::Result<()>;

/// Every subcommand, the options it takes and what runs it.
const COMMANDS: &[(&str, &[&str], Run)] = &[
    ("server", &["listen", "once", "size", "secs"], server::run),
    (
        "latency",
        &["connect", "size", "count", "secs", "warmup"],
        latency::run,
    ),
    ("churn", &["connect", "size", "count", "secs"], churn::run),
    ("relay", &["listen", "upstream", "secs"], relay::run),
    ("sendcost", &["dest", "count", "oob"], |a| {
        sendcost::run(a, false)
    }),
    ("sockcost", &["dest", "count", "secs"], |a| {
        sendcost::run(a, true)
    }),
];

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("graft-bench: {msg} (graft-bench --help)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        return usage_error("a subcommand is required");
    };
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let Some(&(_, known, run)) = COMMANDS.iter().find(|(name, _, _)| name == cmd) else {
        return usage_error(&format!("unknown subcommand `{cmd}`"));
    };
    let a = match args::Args::parse(rest, known) {
        Ok(a) => a,
        Err(e) => return usage_error(&format!("{cmd}: {e}")),
    };
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<args::BadInput>().is_some() => {
            usage_error(&format!("{cmd}: {e}"))
        }
        Err(e) => {
            eprintln!("graft-bench {cmd}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
