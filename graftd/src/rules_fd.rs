//! The broker hands a namespace's rules out as a sealed memfd: the broker's
//! fixed-size reply has no room for them, and a sealed file can be neither
//! changed nor grown by anyone holding it, so each client reads exactly what
//! graftd wrote.

use std::io::{self, Seek, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// A read-only memfd, its offset at the start, holding `blob`.
pub fn sealed(blob: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd_create(
        c"graft-rules",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(blob)?;
    // The receiver shares this file description, offset included.
    f.rewind()?;
    let fd = OwnedFd::from(f);
    fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn sealed_file_holds_the_blob_and_refuses_writes() {
        let fd = sealed(b"a\nb\nc\n").unwrap();
        let mut f = std::fs::File::from(fd);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "a\nb\nc\n");
        assert!(f.write_all(b"x").is_err());
    }
}
