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
  server   --listen ADDR:PORT [--once] [--size N]
  latency  --connect ADDR:PORT [--size 64] [--count N] [--secs S] [--warmup N]
  churn    --connect ADDR:PORT [--size 64] [--count N] [--secs S]
  relay    --listen ADDR:PORT --upstream ADDR:PORT
  sendcost --dest ADDR:PORT [--count N] [--oob]
  sockcost --dest ADDR:PORT [--count N] [--secs S]";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let a = match args::Args::parse(rest) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("graft-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let res = match cmd.as_str() {
        "server" => server::run(&a),
        "latency" => latency::run(&a),
        "churn" => churn::run(&a),
        "relay" => relay::run(&a),
        "sendcost" => sendcost::run(&a, false),
        "sockcost" => sendcost::run(&a, true),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("graft-bench: unknown subcommand `{other}`\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graft-bench {cmd}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
