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
//! Modules: [`persist`] (saved tables), [`notify`] (systemd readiness),
//! [`control`] (control socket), [`broker`] (broker sockets and
//! requests), [`plan`] (how to make the socket a request asks for),
//! [`factory`] (socket creation), [`state`] (tables),
//! [`netns`] (namespace descriptors and threads), [`seccomp`] (serving the
//! seccomp listeners of `graft --mode seccomp`), [`adopt`] (serving them
//! again after a restart), [`gc`] (forgetting unused
//! namespaces), [`ebpf_hooks`] (where graft-ebpf plugs in), [`sys`] (the few
//! raw system calls).

mod adopt;
mod broker;
mod control;
mod ebpf_hooks;
mod factory;
mod gc;
mod netns;
mod notify;
mod persist;
mod plan;
mod rules_fd;
mod seccomp;
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
    /// Do not splice TCP connections whose two ends are both grafted
    /// sockets of this host (by default the eBPF companion hands each send
    /// straight to the peer's receive queue; seccomp-mode programs' sockets
    /// and churning clients stay on TCP either way).
    #[arg(long)]
    no_splice: bool,
    /// Splice (the default; kept for the command lines of earlier releases).
    #[arg(long, hide = true, conflicts_with = "no_splice")]
    splice: bool,
    /// Do not load the eBPF companion (no in-kernel egress policy, counters,
    /// splicing or bind guard: egress ports are then taken when a socket is
    /// handed out, not at connect).
    #[arg(long)]
    no_ebpf: bool,
    /// bpffs directory where the eBPF companion's maps and links are pinned,
    /// so its policy stays armed while graftd is down and the next graftd
    /// adopts it.
    #[arg(
        long,
        value_name = "DIR",
        env = "GRAFT_PIN_DIR",
        default_value = "/sys/fs/bpf/graft"
    )]
    pin_dir: PathBuf,
    /// cgroup v2 the companion is attached to and graftd runs in: a name,
    /// made under the cgroup graftd starts in, or an absolute path from the
    /// cgroup2 root. It must stay the same across restarts.
    #[arg(
        long,
        value_name = "NAME|/PATH",
        env = "GRAFT_CGROUP",
        default_value = "graftd"
    )]
    cgroup: String,
    /// Live sockets an ipv4/ipv6 endpoint without its own `limit` may have
    /// (0: unlimited). Counted by the eBPF companion; not enforced without it.
    #[arg(long, value_name = "N", env = "GRAFT_DEFAULT_LIMIT", default_value_t = DEFAULT_LIMIT,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(graft_core::endpoint::MAX_LIMIT)))]
    default_limit: u32,
    /// Remove the pinned eBPF companion (links, maps, pin directory) and its
    /// cgroup, then exit. graftd must be stopped; endpoint tables are kept.
    #[arg(long)]
    remove: bool,
    /// Where the endpoint tables are saved (a tmpfs: they do not outlive a
    /// reboot, as namespaces do not).
    #[arg(
        long,
        value_name = "DIR",
        env = "GRAFT_STATE_DIR",
        default_value = "/run/graft"
    )]
    state_dir: PathBuf,
    /// Debug logging (RUST_LOG overrides).
    #[arg(short, long)]
    verbose: bool,
}

/// Default of `--default-limit`: far below the host's ephemeral ports
/// (about 28,000), far above what one container normally holds.
const DEFAULT_LIMIT: u32 = 4096;

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
    /// The state directory (absent in unit tests).
    store: Option<persist::Store>,
}

impl Ctx {
    /// The state directory (`None` in unit tests).
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.store.as_ref().map(persist::Store::dir)
    }

    /// The tables. A panic while holding the lock leaves them consistent
    /// (every change is a single insert or remove), so poisoning is ignored.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the tables after a change. Only the control thread changes
    /// them, so saves never race each other. A failed save is logged: the
    /// change is live, but would not survive a restart.
    pub fn persist(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let records = self.state().records();
        if let Err(e) = store.save(records) {
            log::error!("{e}: the endpoint tables will not survive a restart of graftd");
        }
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
    if cli.remove {
        return remove(&cli);
    }
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
    // Before the eBPF companion: a second graftd on the same state gives up
    // without touching anything.
    let store = persist::Store::open(&cli.state_dir)?;
    let saved = store.load()?;
    let info = DaemonInfo {
        splice: cli.splice || !cli.no_splice,
        ebpf: !cli.no_ebpf,
        own_netns: own,
        pin_dir: cli.pin_dir.clone(),
        cgroup: cli.cgroup.clone(),
    };
    let hooks = ebpf_hooks::load(&info);
    hooks.daemon_started(&info);
    let mut state = State::new(own);
    state.set_default_limit((cli.default_limit > 0).then_some(cli.default_limit));
    let ctx = Arc::new(Ctx {
        state: Mutex::new(state),
        hooks,
        broker_name: cli.broker_name.clone(),
        store: Some(store),
    });
    let brokers = broker::spawn(ctx.clone()).context("cannot start the broker thread")?;
    seccomp::probe();
    if !saved.is_empty() {
        let n = persist::restore(&ctx, &brokers, saved);
        log::info!("restored {n} endpoint(s) from {}", cli.state_dir.display());
    }
    // After the tables: a listener is served again only in a namespace
    // graftd still knows.
    let n = adopt::readopt(&ctx);
    if n > 0 {
        log::info!("serving {n} seccomp listener(s) of programs started before this graftd");
    }
    // Ids the pinned companion still holds for endpoints not restored (their
    // namespace went away while graftd was down) are dropped.
    let live: Vec<_> = ctx.state().all();
    ctx.hooks.endpoints_restored(&live);
    // Rewritten at once: what was dropped stays dropped.
    ctx.persist();
    // The control socket appears only once graftd can answer at once: clients
    // (and scripts waiting for the file) never queue behind the eBPF load or
    // the restore.
    let listener = control::bind(&cli.control)?;
    log::info!(
        "graftd listening on {} (broker name \"{}\", own namespace {own})",
        cli.control.display(),
        cli.broker_name
    );
    // Everything restored and the control socket up: systemd (Type=notify)
    // may now consider the service started.
    notify::notify("READY=1");
    let r = control::serve(&ctx, &brokers, &listener, &signals);
    notify::notify("STOPPING=1");
    control::remove(&cli.control);
    ctx.hooks.daemon_stopping();
    r?;
    log::info!("graftd stopped");
    Ok(())
}

/// `graftd --remove`: takes the pinned eBPF companion away for good.
fn remove(cli: &Cli) -> anyhow::Result<()> {
    // A graftd serving this state directory holds its lock.
    let _lock =
        persist::Store::open(&cli.state_dir).context("graftd --remove needs graftd stopped")?;
    let done = graft_ebpf::remove_pinned(&cli.pin_dir, &cli.cgroup)
        .context("cannot remove the eBPF companion")?;
    if done.is_empty() {
        log::info!("nothing pinned in {}", cli.pin_dir.display());
    }
    for line in done {
        log::info!("{line}");
    }
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
