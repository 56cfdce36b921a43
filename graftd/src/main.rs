//! `graftd`: the graft daemon.
//!
//! It keeps one endpoint table per network namespace (defined with `ip graft`
//! over a root-only control socket), opens a broker socket inside every
//! namespace that has endpoints, and answers each broker request with a socket
//! made in the endpoint's target namespace (by default graftd's own, the
//! host's), bound to the endpoint's address and passed back with SCM_RIGHTS.
//!
//! Threads: the main thread serves the control socket, signals and the
//! namespace collector; one broker thread serves every namespace's broker;
//! one factory thread per foreign target namespace makes sockets there. No
//! thread that entered another namespace is ever used for anything else.
//!
//! Modules: [`control`] (control socket), [`broker`] (broker sockets and
//! request checks), [`factory`] (socket creation), [`state`] (tables),
//! [`netns`] (namespace descriptors and threads), [`gc`] (forgetting unused
//! namespaces), [`ebpf_hooks`] (where graft-ebpf plugs in), [`sys`] (the few
//! raw system calls).

mod broker;
mod control;
mod ebpf_hooks;
mod factory;
mod gc;
mod netns;
mod rules_fd;
mod state;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::ebpf_hooks::{DaemonInfo, Hooks};
use crate::state::State;

/// graftd: serves graft endpoints and hands out host sockets to containers.
#[derive(Debug, Parser)]
#[command(name = "graftd", version)]
struct Cli {
    /// Control socket path (ip graft talks to it).
    #[arg(long, value_name = "PATH", env = graft_core::ENV_CONTROL, default_value = graft_core::DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    /// Abstract name of the broker socket opened in each namespace (no leading NUL).
    #[arg(long, value_name = "NAME", env = graft_core::ENV_BROKER, default_value = graft_core::DEFAULT_BROKER_NAME, value_parser = broker_name)]
    broker_name: String,
    /// Splice local grafted connections in the kernel (needs graft-ebpf).
    #[arg(long)]
    splice: bool,
    /// Do not load the eBPF companion (no in-kernel egress policy, counters,
    /// splicing or bind guard: egress ports are then taken when a socket is
    /// handed out, not at connect).
    #[arg(long)]
    no_ebpf: bool,
    /// Debug logging (RUST_LOG overrides).
    #[arg(short, long)]
    verbose: bool,
}

fn broker_name(s: &str) -> Result<String, String> {
    graft_core::check_broker_name(s)
        .map(|()| s.to_owned())
        .map_err(str::to_owned)
}

/// What every thread shares.
pub struct Ctx {
    state: Mutex<State>,
    pub hooks: Box<dyn Hooks>,
    pub broker_name: String,
}

impl Ctx {
    /// The tables. A panic while holding the lock leaves them consistent
    /// (every change is a single insert or remove), so poisoning is ignored.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = if cli.verbose { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default)).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("graftd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    raise_fd_limit();
    let (_own_fd, own) = netns::open_own().context("cannot open graftd's own network namespace")?;
    // Blocked before any thread starts, so every thread inherits the mask and
    // the signals are only ever read from the signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("cannot block signals")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("cannot create signalfd")?;
    control::ensure_free(&cli.control)?;
    let info = DaemonInfo {
        splice: cli.splice,
        ebpf: !cli.no_ebpf,
        own_netns: own,
    };
    let hooks = ebpf_hooks::load(&info);
    hooks.daemon_started(&info);
    // The control socket appears only once graftd can answer at once: clients
    // (and scripts waiting for the file) never queue behind the eBPF load.
    let listener = control::bind(&cli.control)?;
    let ctx = Arc::new(Ctx {
        state: Mutex::new(State::new(own)),
        hooks,
        broker_name: cli.broker_name.clone(),
    });
    let brokers = broker::spawn(ctx.clone()).context("cannot start the broker thread")?;
    log::info!(
        "graftd listening on {} (broker name \"{}\", own namespace {own})",
        cli.control.display(),
        cli.broker_name
    );
    let r = control::serve(&ctx, &brokers, &listener, &signals);
    control::remove(&cli.control);
    ctx.hooks.daemon_stopping();
    r?;
    log::info!("graftd stopped");
    Ok(())
}

/// Brokers keep up to 1024 connections per namespace: lift the soft
/// descriptor limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the descriptor limit to {hard}: {e}");
            }
        }
    }
}
