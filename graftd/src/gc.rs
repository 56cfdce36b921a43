//! The namespace collector: graftd's references keep every namespace it
//! serves alive, so it must notice by itself when nothing else uses one any
//! more (its container is gone, `ip netns del` ran) and let it go.
//!
//! A namespace is in use while a process other than graftd has a thread in it
//! (`/proc/PID/task/TID/ns/net`) or an nsfs bind mount names it (what `ip
//! netns add` and Docker create; seen in `/proc/self/mountinfo` as a mount
//! whose root is `net:[INODE]`). Descriptors held open by other processes are
//! not looked at: a namespace kept only that way has no process to serve.
//!
//! This needs graftd to see every process and mount: it must run in the
//! host's PID and mount namespaces (as a system service does). A namespace
//! forgotten by mistake fails closed: its processes get "no endpoint".

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

use graft_core::NetnsId;

use crate::broker;
use crate::Ctx;

/// Checks every known namespace and forgets the unused ones.
pub fn collect(ctx: &Ctx, brokers: &broker::Handle) {
    let known: HashSet<NetnsId> = ctx.state().known().into_iter().collect();
    if known.is_empty() {
        return;
    }
    let used = in_use(&known);
    for ns in known.difference(&used) {
        // Looked up again under the lock: an endpoint may have been added to
        // it since the scan, by a process that is therefore in it.
        let mut st = ctx.state();
        if !still_unused(*ns) {
            continue;
        }
        let Some(entry) = st.forget(*ns) else {
            continue;
        };
        drop(st);
        brokers.close(*ns);
        let names: Vec<String> = entry.endpoints.keys().map(|n| n.to_string()).collect();
        for ep in entry.endpoints.values() {
            ctx.hooks.endpoint_removed(&ep.hook_ref());
        }
        ctx.persist();
        log::info!(
            "forgot network namespace {ns}: no process or mount uses it any more (dropped endpoints: {})",
            names.join(", ")
        );
    }
}

fn still_unused(ns: NetnsId) -> bool {
    in_use(&HashSet::from([ns])).is_empty()
}

/// The members of `known` that some other process or an nsfs mount uses.
pub fn in_use(known: &HashSet<NetnsId>) -> HashSet<NetnsId> {
    let mut used = HashSet::new();
    for ino in mounted_netns() {
        if let Some(id) = known.iter().find(|k| k.ino == ino) {
            used.insert(*id);
        }
    }
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        // Without /proc nothing can be proven unused: keep everything.
        return known.clone();
    };
    for p in procs.flatten() {
        if used.len() == known.len() {
            break;
        }
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Ok(md) = std::fs::metadata(t.path().join("ns/net")) {
                let id = NetnsId {
                    dev: md.dev(),
                    ino: md.ino(),
                };
                if known.contains(&id) {
                    used.insert(id);
                }
            }
        }
    }
    used
}

/// Inodes of network namespaces bind-mounted somewhere (nsfs mounts).
fn mounted_netns() -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    text.lines().filter_map(parse_mount_root).collect()
}

/// `36 35 0:4 net:[4026532281] /run/netns/c1 rw shared:5 - nsfs nsfs rw`
/// gives 4026532281.
fn parse_mount_root(line: &str) -> Option<u64> {
    let root = line.split_whitespace().nth(3)?;
    root.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nsfs_mount_lines() {
        assert_eq!(
            parse_mount_root(
                "612 30 0:4 net:[4026532281] /run/netns/c1 rw,nosuid shared:264 - nsfs nsfs rw"
            ),
            Some(4026532281)
        );
        assert_eq!(
            parse_mount_root("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"),
            None
        );
        assert_eq!(parse_mount_root("x"), None);
        assert_eq!(
            parse_mount_root("1 2 0:4 mnt:[4026531840] /x rw - nsfs nsfs rw"),
            None
        );
    }

    #[test]
    fn own_namespace_is_in_use() {
        // The test runner's namespace holds at least init.
        let own = NetnsId::current().unwrap();
        let bogus = NetnsId { dev: 1, ino: 1 };
        let used = in_use(&HashSet::from([own, bogus]));
        assert!(used.contains(&own));
        assert!(!used.contains(&bogus));
    }
}
