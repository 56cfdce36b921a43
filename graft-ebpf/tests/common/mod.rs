//! What the pinned-companion tests share.

use std::path::PathBuf;

use graft_ebpf::remove_pinned;

/// A pinned companion's leftovers: on drop (on failure too), moves the
/// process back to its `original` cgroup and removes the pins and the
/// cgroup.
pub struct Cleanup {
    pub pin: PathBuf,
    pub cgroup: String,
    pub original: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(o) = &self.original {
            let _ = std::fs::write(o.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = remove_pinned(&self.pin, &self.cgroup);
    }
}
