//! Pinning in bpffs, so the programs outlive graftd.
//!
//! The cgroup programs are attached with `bpf_link`s that this module makes,
//! pins, adopts and updates with raw `bpf()` calls (aya 0.14 cannot turn
//! every cgroup link into a pinnable one, nor update one in place). A pinned
//! link stays attached while no process holds it; a new graftd opens it and
//! swaps its program with `BPF_LINK_UPDATE`, which the kernel does
//! atomically: no connect() in between runs without a policy check.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `statfs.f_type` of a bpf filesystem.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// `enum bpf_attach_type` values of the hooks graft uses.
pub mod attach {
    pub const CGROUP_INET_SOCK_CREATE: u32 = 2;
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_BIND: u32 = 8;
    pub const CGROUP_INET6_BIND: u32 = 9;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_UDP4_SENDMSG: u32 = 14;
    pub const CGROUP_UDP6_SENDMSG: u32 = 15;
    pub const CGROUP_SETSOCKOPT: u32 = 22;
    pub const CGROUP_INET_SOCK_RELEASE: u32 = 34;
    pub const SK_LOOKUP: u32 = 36;
}

/// One `bpf()` call with a zero-padded attribute block.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable, 64-byte block; the kernel reads at
    // most `size` bytes of it and every field it reads was set by the caller
    // (the rest is zero, which the kernel requires of unused fields).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn lo_hi(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup directory or a
/// network namespace) as a link.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 8];
    // { prog_fd, target_fd }, { attach_type, flags = 0 }
    attr[0] = lo_hi(prog.as_raw_fd() as u32, target.as_raw_fd() as u32);
    attr[1] = lo_hi(attach_type, 0);
    bpf(BPF_LINK_CREATE, &mut attr).and_then(owned)
}

/// `BPF_LINK_UPDATE`: replaces the program of `link` with `prog`, atomically.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 8];
    // { link_fd, new_prog_fd }, { flags = 0, old_prog_fd = 0 }
    attr[0] = lo_hi(link.as_raw_fd() as u32, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `BPF_OBJ_PIN`: pins `fd` at `path` (on bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut attr = [0u64; 8];
    // { pathname }, { bpf_fd, file_flags = 0 }
    attr[0] = p.as_ptr() as u64;
    attr[1] = lo_hi(fd.as_raw_fd() as u32, 0);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// `BPF_OBJ_GET`: opens what is pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut attr = [0u64; 8];
    attr[0] = p.as_ptr() as u64;
    bpf(BPF_OBJ_GET, &mut attr).and_then(owned)
}

/// Whether `path` lies on a bpf filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    let Ok(p) = c_path(path) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: p is a valid NUL-terminated path, st a writable statfs.
    let rc = unsafe { libc::statfs(p.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statfs returned 0, so st is initialized.
    // f_type is signed on some architectures, unsigned on others.
    rc == 0 && unsafe { st.assume_init() }.f_type as u64 == BPF_FS_MAGIC
}

/// Mounts bpffs on `dir` (what systemd does at boot on /sys/fs/bpf; some
/// container hosts skip it).
pub fn mount_bpffs(dir: &Path) -> io::Result<()> {
    mount_fs("bpf", dir)
}

/// Mounts a fresh `fstype` (a pseudo filesystem: bpf, cgroup2) on `dir`,
/// without setuid, devices or exec.
pub(crate) fn mount_fs(fstype: &str, dir: &Path) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let (src, fstype) = (c(fstype)?, c(fstype)?);
    let target = c_path(dir)?;
    // SAFETY: valid NUL-terminated strings outliving the call; NULL data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
