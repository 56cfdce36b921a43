//! The brokers: one abstract `SOCK_SEQPACKET` listener per namespace with
//! endpoints, all served by one thread that stays in graftd's own namespace.
//!
//! Each listener was created inside its namespace (see
//! [`crate::netns::make_broker`]), so only processes of that namespace can
//! connect to it; every connection remembers which listener it came from and
//! is served from that namespace's table only. Everything is non-blocking: a
//! client that sends slowly or never reads its replies costs the others
//! nothing (a reply that cannot be sent at once closes the connection). A
//! namespace whose broker has [`MAX_CONNS_PER_BROKER`] connections open
//! closes the one idle longest for each new one, so a process holding
//! connections open can neither starve its own namespace's newcomers nor,
//! being bounded per namespace, anyone else's.
//!
//! Modules: [`event_loop`] (the thread's poll loop: accepting, reading and
//! replying), [`decode`] (records to requests, and the reply to a malformed
//! one), [`handle`] (answering a request from the namespace's table, with
//! [`crate::plan`] deciding each socket and [`crate::factory`] making it).

mod decode;
mod event_loop;
mod handle;

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use graft_core::NetnsId;

use crate::Ctx;

pub use handle::{handle_sized, Batch, LogBudget, CHURN_WINDOW};

/// Most connections one namespace's broker keeps open.
pub const MAX_CONNS_PER_BROKER: usize = 1024;
/// Longest the control thread waits for a broker to be closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Instructions from the control thread.
pub enum Cmd {
    /// Start serving a namespace's listener.
    Open(NetnsId, OwnedFd),
    /// Stop serving a namespace: close its listener and connections, then
    /// acknowledge (the abstract name is free again once acknowledged).
    Close(NetnsId, mpsc::SyncSender<()>),
}

/// The control thread's handle on the broker thread.
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
    wake: UnixDatagram,
}

impl Handle {
    /// Hands a namespace's new listener to the broker thread.
    pub fn open(&self, ns: NetnsId, listener: OwnedFd) {
        self.send(Cmd::Open(ns, listener));
    }

    /// Closes a namespace's broker and waits until it is closed, so a new
    /// endpoint added right after can bind the same abstract name again.
    /// Must not be called with the state lock held (the broker thread may be
    /// waiting for it).
    pub fn close(&self, ns: NetnsId) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Cmd::Close(ns, tx));
        if rx.recv_timeout(CLOSE_TIMEOUT).is_err() {
            log::warn!("broker thread did not confirm closing the broker of {ns}");
        }
    }

    fn send(&self, cmd: Cmd) {
        if self.tx.send(cmd).is_err() {
            log::error!("broker thread is gone");
            return;
        }
        // A full wake buffer means a wake-up is already pending.
        let _ = self.wake.send(&[1]);
    }
}

/// Starts the broker thread.
pub fn spawn(ctx: Arc<Ctx>) -> io::Result<Handle> {
    let (tx, rx) = mpsc::channel();
    let (wake, wake_rx) = UnixDatagram::pair()?;
    wake.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                event_loop::Loop::new(ctx, rx, wake_rx).run()
            }));
            // Without its broker thread graftd would accept endpoints it can
            // no longer serve: fail loudly instead.
            let why = if served.is_err() {
                "panicked"
            } else {
                "stopped"
            };
            log::error!("broker thread {why}; graftd exits");
            std::process::exit(70);
        })?;
    Ok(Handle { tx, wake })
}
