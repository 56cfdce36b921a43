//! Where graft-ebpf plugs into graftd.
//!
//! graftd calls these hooks at the points the kernel-side companion needs to
//! know about; every method has a no-op default, and [`NoHooks`] is what runs
//! when the eBPF programs are not built in or cannot be loaded. Contract:
//!
//! * Hooks run on graftd's threads (control thread, broker thread) and must
//!   return quickly; they never block on I/O of a client.
//! * [`Hooks::socket_handed_out`] runs on every socket before it is sent;
//!   returning an error refuses the request (the client gets that errno with
//!   `Reason::Policy`), so a policy that cannot be recorded fails closed.
//! * [`Hooks::merge_stats`] fills the optional counters of `Stats`; graftd's
//!   own counters (`sockets`, `refused`) are already set.
//!
//! Call sites: `main.rs` (`load`, then `daemon_started`, before any thread
//! starts serving), `control.rs` (`endpoint_added`, `endpoint_removed`,
//! `merge_stats` for `show`), `gc.rs` (`endpoint_removed` for every endpoint
//! of a forgotten namespace), `broker.rs` (`socket_handed_out`, on the broker
//! thread, after bind and before the reply is sent). To plug graft-ebpf in,
//! make `load` return its implementation (falling back to [`NoHooks`] with
//! one log line when the programs cannot be loaded).

use std::io;
use std::os::fd::BorrowedFd;

use graft_core::endpoint::EndpointAddr;
use graft_core::proto::broker::Purpose;
use graft_core::proto::control::Stats;
use graft_core::rules::PolicyRule;
use graft_core::{EndpointName, NetnsId};

/// What graftd knows about itself when it starts.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// `graftd --splice` was given.
    pub splice: bool,
    /// graftd's own network namespace (the default target).
    pub own_netns: NetnsId,
}

/// An endpoint, as the hooks see it.
#[derive(Debug, Clone, Copy)]
pub struct EndpointRef<'a> {
    /// Unique for the daemon's lifetime; a re-added name gets a new id.
    pub id: u64,
    pub name: &'a EndpointName,
    /// The namespace whose table holds the endpoint.
    pub netns: NetnsId,
    /// The namespace its sockets are made in.
    pub target: NetnsId,
    pub addr: &'a EndpointAddr,
    /// Egress policy clauses (empty: allow all).
    pub policy: &'a [PolicyRule],
}

/// The hook points. See the module documentation for the contract.
pub trait Hooks: Send + Sync {
    /// Once, after start-up (this is where cgroup placement and program
    /// loading happen) and before the first request is served.
    fn daemon_started(&self, _info: &DaemonInfo) {}

    /// An endpoint was added.
    fn endpoint_added(&self, _ep: &EndpointRef<'_>) {}

    /// An endpoint was removed (by `del`, or because its namespace was
    /// forgotten).
    fn endpoint_removed(&self, _ep: &EndpointRef<'_>) {}

    /// A socket was made and bound for `ep` and is about to be handed out;
    /// `purpose` says whether the application asked for it to listen
    /// (ingress) or to connect/send (egress).
    fn socket_handed_out(
        &self,
        _sock: BorrowedFd<'_>,
        _ep: &EndpointRef<'_>,
        _purpose: Purpose,
    ) -> io::Result<()> {
        Ok(())
    }

    /// `show` asks for the counters of `ep`: add the kernel-side ones.
    fn merge_stats(&self, _ep: &EndpointRef<'_>, _stats: &mut Stats) {}
}

/// graftd without its kernel-side companion.
#[derive(Debug, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}

/// The hooks graftd runs with.
pub fn load(info: &DaemonInfo) -> Box<dyn Hooks> {
    log::info!(
        "eBPF companion not built in: running without in-kernel egress policy, kernel counters{}",
        if info.splice {
            " and splicing (--splice ignored)"
        } else {
            " and splicing"
        }
    );
    Box::new(NoHooks)
}
