//! Finding network namespaces the way iproute2 names them: a pid, a name under
//! `/run/netns`, or a path to an nsfs file. graftd identifies namespaces by the
//! descriptor we pass, never by the spelling, so the spelling is kept only for
//! display.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

/// Why a `netns` argument does not name a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "Error: cannot {} netns \"{spec}\": {}: {}",
        if source.kind() == io::ErrorKind::NotFound { "find" } else { "open" },
        path.display(),
        desc(source)
    )]
    Open {
        spec: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("Error: cannot find netns \"\": the name is empty")]
    Empty,
    #[error("Error: netns \"{spec}\" ({}) is not a network namespace", path.display())]
    NotNet { spec: String, path: PathBuf },
}

/// The text of an OS error without Rust's " (os error N)" suffix, as C tools
/// print it.
pub fn desc(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_owned(),
        None => e.to_string(),
    }
}

/// Where `spec` points: all digits is a pid, anything with a `/` is a path,
/// anything else a name made by `ip netns add`.
pub fn path_for(spec: &str) -> PathBuf {
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        PathBuf::from(format!("/proc/{spec}/ns/net"))
    } else if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from("/run/netns").join(spec)
    }
}

/// Opens the namespace `spec` names and checks that it is a network namespace.
pub fn open(spec: &str) -> Result<OwnedFd, NetnsError> {
    if spec.is_empty() {
        return Err(NetnsError::Empty);
    }
    let path = path_for(spec);
    let f = File::open(&path).map_err(|source| NetnsError::Open {
        spec: spec.to_owned(),
        path: path.clone(),
        source,
    })?;
    if !is_net_ns(&f) {
        return Err(NetnsError::NotNet {
            spec: spec.to_owned(),
            path,
        });
    }
    Ok(f.into())
}

/// The caller's own network namespace.
pub fn open_self() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/self/ns/net")?.into())
}

/// Whether `f` is an nsfs file of a network namespace. An nsfs descriptor
/// opened through `/proc/PID/ns/*` shows as `TYPE:[INODE]` in `/proc/self/fd`,
/// which tells the type without an ioctl (and so without unsafe code); one
/// opened through a bind mount (`/run/netns/NAME`) shows the mount's path, and
/// there graftd's `setns(CLONE_NEWNET)` is the final judge.
fn is_net_ns(f: &File) -> bool {
    use nix::sys::statfs::{fstatfs, NSFS_MAGIC};
    if !fstatfs(f).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC) {
        return false;
    }
    let link = format!("/proc/self/fd/{}", f.as_raw_fd());
    let Ok(target) = std::fs::read_link(link) else {
        return true;
    };
    let t = target.to_string_lossy();
    let typed = t.split_once(":[").is_some_and(|(kind, _)| {
        !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    });
    !typed || t.starts_with("net:[")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelling_to_path() {
        assert_eq!(path_for("1"), PathBuf::from("/proc/1/ns/net"));
        assert_eq!(path_for("c1"), PathBuf::from("/run/netns/c1"));
        assert_eq!(path_for("/proc/1/ns/net"), PathBuf::from("/proc/1/ns/net"));
        assert_eq!(path_for("./x"), PathBuf::from("./x"));
    }

    #[test]
    fn errors_name_the_spelling_and_path() {
        let e = open("no-such-ns-graft-test").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error: cannot find netns \"no-such-ns-graft-test\": \
             /run/netns/no-such-ns-graft-test: No such file or directory"
        );
        assert_eq!(
            open("").unwrap_err().to_string(),
            "Error: cannot find netns \"\": the name is empty"
        );
        assert_eq!(
            open("/etc/hostname").unwrap_err().to_string(),
            "Error: netns \"/etc/hostname\" (/etc/hostname) is not a network namespace"
        );
    }

    #[test]
    fn bind_mounted_namespace_is_accepted() {
        // `ip netns add` bind-mounts nsfs files under /run/netns; use one if
        // this machine has any (needs no privileges to open).
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(f) = File::open(e.path()) {
                if nix::sys::statfs::fstatfs(&f)
                    .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
                {
                    assert!(open(&name).is_ok(), "{name}");
                    return;
                }
            }
        }
    }

    #[test]
    fn own_namespace_is_a_network_namespace() {
        assert!(open("/proc/self/ns/net").is_ok());
        // A namespace of another type is refused.
        assert!(matches!(
            open("/proc/self/ns/uts"),
            Err(NetnsError::NotNet { .. })
        ));
    }
}
