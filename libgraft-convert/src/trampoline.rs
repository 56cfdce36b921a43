//! The library's own `syscall` instruction, on a page at the fixed address
//! [`graft_core::TRAMPOLINE_PAGE`].
//!
//! In preload mode `graft` also installs a seccomp filter, so that the calls
//! this library cannot interpose (glibc's resolver uses internal aliases of
//! `connect`/`sendto`; programs call `syscall()` directly) reach graftd.
//! Calls the library passes through were decided already and must not pay
//! a round trip: they are made from this page, which the filter allows by
//! instruction pointer. The filter is installed before exec, when the
//! library's own address is unknown (ASLR), hence the fixed page. When the
//! page cannot be mapped (something else lives there), the calls go
//! through libc as before: they are then trapped too and graftd lets them
//! continue (it leaves host sockets and unmatched calls alone).

use std::sync::atomic::{AtomicBool, Ordering};

static MAPPED: AtomicBool = AtomicBool::new(false);

/// `long trampoline(long nr, long a1, …, long a6)`: the System V argument
/// registers shifted into the kernel's, the sixth argument from the stack.
#[cfg(target_arch = "x86_64")]
const CODE: [u8; 28] = [
    0x48, 0x89, 0xf8, // mov rax, rdi
    0x48, 0x89, 0xf7, // mov rdi, rsi
    0x48, 0x89, 0xd6, // mov rsi, rdx
    0x48, 0x89, 0xca, // mov rdx, rcx
    0x4d, 0x89, 0xc2, // mov r10, r8
    0x4d, 0x89, 0xc8, // mov r8, r9
    0x4c, 0x8b, 0x4c, 0x24, 0x08, // mov r9, [rsp+8]
    0x0f, 0x05, // syscall
    0xc3, // ret
    0xcc, 0xcc, // int3 padding
];

type Trampoline = unsafe extern "C" fn(i64, i64, i64, i64, i64, i64, i64) -> i64;

/// Maps the page (constructor only; a no-op on other architectures).
pub fn map() {
    #[cfg(target_arch = "x86_64")]
    {
        const LEN: usize = 4096;
        let want = graft_core::TRAMPOLINE_PAGE as usize as *mut libc::c_void;
        // SAFETY: a fresh anonymous mapping; MAP_FIXED_NOREPLACE never
        // replaces an existing one (EEXIST instead).
        let p = unsafe {
            libc::mmap(
                want,
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return;
        }
        if p != want {
            // A kernel older than 4.17 treats the flag as a hint.
            // SAFETY: p is the mapping we just made, nobody else uses it.
            unsafe { libc::munmap(p, LEN) };
            return;
        }
        // SAFETY: p is writable for LEN bytes and CODE is shorter; then the
        // page becomes read+execute only.
        let ok = unsafe {
            std::ptr::copy_nonoverlapping(CODE.as_ptr(), p.cast::<u8>(), CODE.len());
            libc::mprotect(p, LEN, libc::PROT_READ | libc::PROT_EXEC) == 0
        };
        MAPPED.store(ok, Ordering::Release);
    }
}

/// A system call made from the page, or `None` when it is not mapped.
/// The result is the kernel's: negative errno on failure.
///
/// # Safety
/// The same as the system call `nr` with these arguments.
#[inline]
pub unsafe fn call(nr: i64, a: [i64; 6]) -> Option<i64> {
    if !MAPPED.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: the page holds CODE (mapped above, never unmapped), a
    // function with this C signature.
    let f: Trampoline =
        unsafe { std::mem::transmute::<usize, Trampoline>(graft_core::TRAMPOLINE_PAGE as usize) };
    // SAFETY: the caller upholds the system call's contract.
    Some(unsafe { f(nr, a[0], a[1], a[2], a[3], a[4], a[5]) })
}
