//! Network namespace identity.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A network namespace, identified the only stable way there is: the device
/// and inode of its nsfs file. Names and pids are only ways to find one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// Identity of the namespace file behind `fd` (anything `fstat` accepts).
    pub fn of_fd(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fd is a valid borrowed descriptor and st points to writable
        // memory of the right size; fstat initializes it on success.
        let rc = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstat returned 0, so st is initialized.
        let st = unsafe { st.assume_init() };
        Ok(Self {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// Identity of the calling thread's network namespace.
    pub fn current() -> std::io::Result<Self> {
        let f = std::fs::File::open("/proc/thread-self/ns/net")?;
        use std::os::fd::AsFd;
        Self::of_fd(f.as_fd())
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}
