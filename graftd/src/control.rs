//! The control socket: `ip graft` requests, served on graftd's main thread
//! together with signals and the namespace collector.
//!
//! One JSON record per request, on a `SOCK_SEQPACKET` socket at a filesystem
//! path (mode 0600, root only, and SO_PEERCRED checked again). The first
//! SCM_RIGHTS descriptor names the caller's network namespace: the table the
//! request reads or changes. Every malformed request gets an error reply and
//! the daemon goes on serving.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use graft_core::proto::control::{self, ErrorReply, Reply, Request, MAX_MESSAGE};
use graft_core::{EndpointName, EndpointSpec, NetnsId};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{self as nsock, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use crate::broker;
use crate::factory::TargetWorker;
use crate::state::Target;
use crate::{gc, netns, sys, Ctx};

/// Most control connections served at once (clients are root tools).
const MAX_CONTROL_CONNS: usize = 64;
/// How often namespaces are checked for being unused.
const GC_EVERY: Duration = Duration::from_secs(2);

/// Fails when a live graftd already serves `path`; removes a stale socket
/// file left by one that died. Called before the eBPF companion loads, so a
/// second daemon gives up before touching cgroups.
pub fn ensure_free(path: &Path) -> anyhow::Result<()> {
    let addr = UnixAddr::new(path)
        .with_context(|| format!("bad control socket path {}", path.display()))?;
    check_free(path, &addr)
}

fn check_free(path: &Path, addr: &UnixAddr) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            let probe = nsock::socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            match nsock::connect(probe.as_raw_fd(), addr) {
                Ok(()) => bail!(
                    "{} is in use by a running graftd (stop it, or give another --control path)",
                    path.display()
                ),
                Err(nix::errno::Errno::ECONNREFUSED) => {
                    log::info!("removing stale control socket {}", path.display());
                    std::fs::remove_file(path)
                        .with_context(|| format!("cannot remove {}", path.display()))?;
                }
                Err(e) => bail!("{} exists and cannot be probed: {e}", path.display()),
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot inspect {}: {e}", path.display()),
    }
    Ok(())
}

/// Creates the control socket at `path`: parent directory (0755) made if
/// missing, a stale socket file replaced, a live daemon's left alone.
pub fn bind(path: &Path) -> anyhow::Result<OwnedFd> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot chmod {}", dir.display()))?;
        }
    }
    let addr = UnixAddr::new(path)
        .with_context(|| format!("bad control socket path {}", path.display()))?;
    check_free(path, &addr)?;
    let fd = nsock::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .context("cannot create the control socket")?;
    // The socket is bound under a private name and renamed into place once
    // it listens, so whoever sees `path` can connect: a client (or a
    // supervisor waiting for the file) never meets a bound socket that
    // refuses connections.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let tmp_addr = UnixAddr::new(&tmp)
        .with_context(|| format!("bad control socket path {}", tmp.display()))?;
    // Only the main thread exists here, so the umask change cannot leak into
    // files another thread creates; it closes the window between bind and
    // chmod in which the socket would be reachable by others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let r = nsock::bind(fd.as_raw_fd(), &tmp_addr);
    nix::sys::stat::umask(old);
    r.with_context(|| format!("cannot bind the control socket {}", tmp.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", tmp.display()))
        .and_then(|()| {
            nsock::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
                .context("cannot listen on the control socket")
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
        });
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed?;
    Ok(fd)
}

struct Conn {
    fd: OwnedFd,
    uid: Option<u32>,
    /// Last time it sent a request (or was accepted).
    last: Instant,
}

/// Serves control requests until SIGTERM or SIGINT arrives on `signals`.
pub fn serve(
    ctx: &Arc<Ctx>,
    brokers: &broker::Handle,
    listener: &OwnedFd,
    signals: &SignalFd,
) -> anyhow::Result<()> {
    let mut conns: Vec<Conn> = Vec::new();
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut next_gc = Instant::now() + GC_EVERY;
    loop {
        let now = Instant::now();
        if now >= next_gc {
            gc::collect(ctx, brokers);
            next_gc = Instant::now() + GC_EVERY;
            continue;
        }
        let timeout = PollTimeout::try_from(next_gc - now).unwrap_or(PollTimeout::MAX);
        let ev: Vec<PollFlags> = {
            let mut pfds = vec![
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            ];
            pfds.extend(
                conns
                    .iter()
                    .map(|c| PollFd::new(c.fd.as_fd(), PollFlags::POLLIN)),
            );
            match nix::poll::poll(&mut pfds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => bail!("poll on the control socket failed: {e}"),
            }
            pfds.iter()
                .map(|p| p.revents().unwrap_or(PollFlags::empty()))
                .collect()
        };
        if !ev[0].is_empty() {
            if let Ok(Some(si)) = signals.read_signal() {
                let name = nix::sys::signal::Signal::try_from(si.ssi_signo as i32)
                    .map_or("a signal", |s| s.as_str());
                log::info!("{name} received, shutting down");
                return Ok(());
            }
        }
        let mut dead = Vec::new();
        for (i, e) in ev[2..].iter().enumerate() {
            if e.is_empty() {
                continue;
            }
            conns[i].last = Instant::now();
            if !serve_conn(ctx, brokers, &conns[i], &mut buf) {
                dead.push(i);
            }
        }
        for i in dead.into_iter().rev() {
            conns.swap_remove(i);
        }
        if !ev[1].is_empty() {
            for _ in 0..MAX_CONTROL_CONNS {
                match sys::accept(listener.as_fd()) {
                    Ok(fd) => {
                        // A client holding connections open must not lock
                        // the others out: the one idle longest makes room.
                        if conns.len() >= MAX_CONTROL_CONNS {
                            if let Some(i) = (0..conns.len()).min_by_key(|&i| conns[i].last) {
                                log::warn!(
                                    "{MAX_CONTROL_CONNS} control connections open, closing the one idle longest"
                                );
                                conns.swap_remove(i);
                            }
                        }
                        let uid = nsock::getsockopt(&fd, nsock::sockopt::PeerCredentials)
                            .ok()
                            .map(|c| c.uid());
                        conns.push(Conn {
                            fd,
                            uid,
                            last: Instant::now(),
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("control accept: {e}");
                        break;
                    }
                }
            }
        }
    }
}

/// Serves what one control connection sent; false when it must be closed.
fn serve_conn(ctx: &Ctx, brokers: &broker::Handle, c: &Conn, buf: &mut [u8]) -> bool {
    for _ in 0..8 {
        let rx = match sys::next_record(c.fd.as_fd(), buf) {
            sys::Next::Record(rx) => rx,
            sys::Next::Idle => return true,
            sys::Next::Gone => return false,
        };
        let len = rx.len.min(buf.len());
        let reply = handle(ctx, brokers, c.uid, &buf[..len], rx);
        if let Reply::Error(e) = &reply {
            log::debug!(
                "control request refused: {} ({})",
                e.message,
                io::Error::from_raw_os_error(e.errno)
            );
        }
        if let Err(e) = sys::send_record(c.fd.as_fd(), &control::encode(&reply), &[]) {
            log::debug!("control: cannot reply ({e}); closing the connection");
            return false;
        }
    }
    true
}

fn err(errno: i32, message: impl Into<String>) -> Reply {
    Reply::Error(ErrorReply {
        errno,
        message: message.into(),
    })
}

/// Answers one control record.
fn handle(
    ctx: &Ctx,
    brokers: &broker::Handle,
    uid: Option<u32>,
    rec: &[u8],
    rx: sys::Received,
) -> Reply {
    match uid {
        Some(0) => {}
        Some(u) => {
            return err(
                libc::EPERM,
                format!("graftd serves root only (caller uid {u})"),
            )
        }
        None => {
            return err(
                libc::EPERM,
                "cannot identify the caller (SO_PEERCRED failed)",
            )
        }
    }
    if rx.truncated || rx.len > MAX_MESSAGE {
        return err(
            libc::EMSGSIZE,
            format!("request of {} bytes exceeds {MAX_MESSAGE}", rx.len),
        );
    }
    if rx.ctrunc {
        return err(libc::EINVAL, "too many descriptors attached to the request");
    }
    let mut fds = rx.fds.into_iter();
    let Some(caller_fd) = fds.next() else {
        return err(
            libc::EINVAL,
            "request carries no network namespace descriptor (SCM_RIGHTS of /proc/self/ns/net)",
        );
    };
    let second = fds.next();
    // Anything beyond the second descriptor is closed here.
    drop(fds);
    let caller = match netns::identify(caller_fd.as_fd()) {
        Ok(id) => id,
        Err(e) => return err(e.errno(), format!("first descriptor: {e}")),
    };
    let req = match control::decode_request(rec) {
        Ok(r) => r,
        Err(e) => return err(libc::EINVAL, e.to_string()),
    };
    match req {
        Request::Ping {} => Reply::Ok {
            netns: caller,
            endpoints: vec![],
        },
        Request::Show {} => show(ctx, caller),
        Request::SetRules { rules } => set_rules(ctx, caller, &rules),
        Request::GetRules {} => Reply::Rules {
            netns: caller,
            rules: ctx.state().rules(caller),
        },
        Request::Del { name } => del(ctx, brokers, caller, &name),
        Request::Add {
            endpoint,
            target_fd,
        } => {
            let target = match (target_fd, second) {
                (true, Some(fd)) => match netns::identify(fd.as_fd()) {
                    Ok(id) => Some((fd, id)),
                    Err(e) => return err(e.errno(), format!("target namespace descriptor: {e}")),
                },
                (true, None) => {
                    return err(
                        libc::EINVAL,
                        "add with target_fd carries no target namespace descriptor",
                    )
                }
                (false, _) => None,
            };
            add(ctx, brokers, caller_fd, caller, endpoint, target)
        }
    }
}

fn show(ctx: &Ctx, ns: NetnsId) -> Reply {
    let eps = ctx.state().list(ns);
    let endpoints = eps
        .iter()
        .map(|ep| {
            let mut s = ep.stats();
            s.limit = ep.limit.map(u64::from);
            ctx.hooks.merge_stats(&ep.hook_ref(), &mut s);
            ep.info(s)
        })
        .collect();
    Reply::Ok {
        netns: ns,
        endpoints,
    }
}

fn set_rules(ctx: &Ctx, ns: NetnsId, rules: &graft_core::nsrules::NsRules) -> Reply {
    let r = ctx.state().set_rules(ns, rules);
    match r {
        Ok(()) => {
            ctx.persist();
            log::info!(
                "{ns}: rules {}",
                if rules.is_empty() { "cleared" } else { "set" }
            );
            Reply::Ok {
                netns: ns,
                endpoints: vec![],
            }
        }
        Err(e) => err(e.errno(), e.to_string()),
    }
}

fn del(ctx: &Ctx, brokers: &broker::Handle, ns: NetnsId, name: &EndpointName) -> Reply {
    let mut st = ctx.state();
    match st.remove(ns, name) {
        Ok((ep, emptied)) => {
            drop(st);
            if emptied {
                brokers.close(ns);
            }
            ctx.hooks.endpoint_removed(&ep.hook_ref());
            ctx.persist();
            log::info!(
                "{ns}: removed endpoint {}{}",
                ep.spec.name,
                if emptied {
                    " (last one: broker closed)"
                } else {
                    ""
                }
            );
            Reply::Ok {
                netns: ns,
                endpoints: vec![],
            }
        }
        Err(e) => err(e.errno(), e.to_string()),
    }
}

fn add(
    ctx: &Ctx,
    brokers: &broker::Handle,
    caller_fd: OwnedFd,
    ns: NetnsId,
    spec: EndpointSpec,
    target: Option<(OwnedFd, NetnsId)>,
) -> Reply {
    let mut st = ctx.state();
    let target_id = target.as_ref().map_or(st.own(), |t| t.1);
    if let Err(e) = st.check_add(ns, &spec, target_id) {
        return err(e.errno(), e.to_string());
    }
    let target = match target {
        None => Target::Own,
        Some((_, id)) if id == st.own() => Target::Own,
        Some((fd, id)) => match st.worker(id) {
            Some(w) => Target::Foreign(w),
            None => match TargetWorker::spawn(fd, id) {
                Ok(w) => {
                    let w = Arc::new(w);
                    st.remember_worker(&w);
                    Target::Foreign(w)
                }
                Err(e) => {
                    return err(
                        e.raw_os_error().unwrap_or(libc::EIO),
                        format!("cannot start a socket factory in target namespace {id}: {e}"),
                    )
                }
            },
        },
    };
    let listener = if st.has(ns) {
        None
    } else {
        match netns::make_broker(caller_fd.as_fd(), ns, &ctx.broker_name) {
            Ok(l) => Some(l),
            Err(e) => {
                let hint = if e.errno() == libc::EADDRINUSE {
                    " (another graftd with the same --broker-name serves this namespace?)"
                } else {
                    ""
                };
                return err(e.errno(), format!("{e}{hint}"));
            }
        }
    };
    let ep = st.insert(ns, caller_fd, spec, target_id, target);
    if let Some(l) = listener {
        brokers.open(ns, l);
    }
    drop(st);
    ctx.hooks.endpoint_added(&ep.hook_ref());
    ctx.persist();
    log::info!("{ns}: added endpoint {} (target {target_id})", ep.spec);
    Reply::Ok {
        netns: ns,
        endpoints: vec![ep.info(ep.stats())],
    }
}

/// Removes the control socket file at shutdown.
pub fn remove(path: &PathBuf) {
    if let Err(e) = std::fs::remove_file(path) {
        log::warn!("cannot remove {}: {e}", path.display());
    }
}
