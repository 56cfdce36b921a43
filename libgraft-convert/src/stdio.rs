//! stdio streams on grafted TCP sockets.
//!
//! A spliced socket's receive can fail with EAGAIN although the socket is
//! blocking (see `after_eagain` in the interposed receives, which repeat
//! it). glibc's stdio reads through libc's internal `read`, which no preload
//! library sees, so a program that `fdopen`s a socket and reads it with
//! `fread`/`fgets`/`getline` would see that EAGAIN as a stream error. Our
//! `fdopen` therefore gives a grafted or accepted TCP socket a stream whose
//! reads, writes and close are ours (`fopencookie`), and reads go through
//! the interposed `read`. The stream is otherwise the one `fdopen` would
//! make: the same mode, `fileno()` gives the descriptor (set in the FILE,
//! whose layout is checked once against `stderr`), seeking fails with
//! ESPIPE, a write that fails part-way sets the error flag, and `fclose`
//! closes the descriptor. Its buffer is BUFSIZ instead of the socket's
//! st_blksize. Every other descriptor gets libc's `fdopen`.

use std::sync::atomic::{AtomicU8, Ordering};

use libc::{c_char, c_int, c_void, size_t, ssize_t, FILE};

use crate::{config, decide, interpose, sys};

/// glibc's `cookie_io_functions_t`.
#[repr(C)]
struct CookieIo {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, io: CookieIo) -> *mut FILE;
    static stderr: *mut FILE;
    static mut stdin: *mut FILE;
}

/// Offset of `_fileno` in glibc's `struct _IO_FILE` on LP64: `_flags` and
/// its padding, then thirteen pointers (eight for the read, write and buffer
/// areas, three for the save areas, markers, chain).
const FILENO_AT: usize = 8 + 13 * 8;

/// 0: not checked yet; 1: `FILENO_AT` holds stderr's descriptor; 2: it does
/// not (an unexpected libc): no stream of ours is made.
static LAYOUT: AtomicU8 = AtomicU8::new(0);

fn layout_known() -> bool {
    match LAYOUT.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: libc's stderr stream, a valid FILE for the process's
            // life; reading an int inside the struct (it is larger than
            // FILENO_AT + 4 on every glibc) changes nothing.
            let ok = unsafe {
                let f = stderr;
                !f.is_null()
                    && std::ptr::read_unaligned(f.cast::<u8>().add(FILENO_AT).cast::<c_int>()) == 2
            };
            LAYOUT.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
    }
}

/// Whether `fd` needs a stream of ours: a TCP socket the library grafted
/// or accepted (the sockets that can be spliced).
fn ours(fd: c_int) -> bool {
    config::active() && decide::known_tcp(fd)
}

fn fd_of(cookie: *mut c_void) -> c_int {
    cookie as usize as c_int
}

unsafe extern "C" fn cookie_read(cookie: *mut c_void, buf: *mut c_char, n: size_t) -> ssize_t {
    // SAFETY: stdio's buffer of `n` bytes, passed on as read(2) takes it.
    unsafe { interpose::read(fd_of(cookie), buf.cast(), n) }
}

/// Writes all of `buf` or fails part-way, as glibc's own file streams do
/// (the count written; the stream sets its error flag when it is short).
unsafe extern "C" fn cookie_write(cookie: *mut c_void, buf: *const c_char, n: size_t) -> ssize_t {
    if n == 0 || buf.is_null() {
        return 0;
    }
    // SAFETY: stdio's buffer of `n` bytes, readable for the call.
    let b = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n) };
    let mut done = 0;
    while done < n {
        match sys::sys_write(fd_of(cookie), &b[done..]) {
            Ok(k) if k > 0 => done += k,
            _ => break,
        }
    }
    done as ssize_t
}

unsafe extern "C" fn cookie_seek(_: *mut c_void, _: *mut i64, _: c_int) -> c_int {
    sys::set_errno(libc::ESPIPE);
    -1
}

unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    // SAFETY: the stream owned this descriptor; fclose gives it up once.
    unsafe { interpose::close(fd_of(cookie)) }
}

/// A stream of ours on `fd` with `mode`, as fdopen(3) would make it;
/// `None` when `fd` does not need one.
fn stream(fd: c_int, mode: *const c_char) -> Option<*mut FILE> {
    if mode.is_null() || !ours(fd) || !layout_known() {
        return None;
    }
    // SAFETY: fdopen's mode, a NUL-terminated string by its contract.
    let m = unsafe { std::ffi::CStr::from_ptr(mode) }.to_bytes();
    // fdopen's 'e' (close-on-exec), which fopencookie ignores; glibc reads
    // at most the first 7 characters of a mode.
    if m.iter().take(7).any(|&c| c == b'e') {
        let fl = sys::sys_fcntl(fd, libc::F_GETFD, 0).ok()?;
        sys::sys_fcntl(fd, libc::F_SETFD, libc::c_long::from(fl | libc::FD_CLOEXEC)).ok()?;
    }
    let io = CookieIo {
        read: Some(cookie_read),
        write: Some(cookie_write),
        seek: Some(cookie_seek),
        close: Some(cookie_close),
    };
    // SAFETY: `mode` as the caller gave it; the cookie is the descriptor.
    let f = unsafe { fopencookie(fd as usize as *mut c_void, mode, io) };
    if !f.is_null() {
        // SAFETY: a FILE fopencookie just made, whose `_fileno` sits at
        // FILENO_AT (checked against stderr); with it set, fileno()
        // answers `fd` and fclose still calls our close.
        unsafe { std::ptr::write_unaligned(f.cast::<u8>().add(FILENO_AT).cast::<c_int>(), fd) };
    }
    Some(f)
}

/// # Safety
/// fdopen(3).
#[no_mangle]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut FILE {
    match stream(fd, mode) {
        Some(f) => f,
        // SAFETY: forwarded unchanged.
        None => unsafe { sys::fdopen(fd, mode) },
    }
}

/// In the constructor, when descriptor 0 is a TCP connection the process
/// inherited (an inetd-style program, whose requests come on stdin): makes
/// `stdin` a stream of ours on it, before anything read from libc's. A
/// program that reads stdin through stdio (`fgets(.., stdin)`, `scanf`,
/// `getchar`) then reads through the library's `read`. C++ streams set up
/// before this keep libc's stream.
pub fn adopt_stdin() {
    if let Some(f) = stream(0, c"r".as_ptr()).filter(|f| !f.is_null()) {
        // SAFETY: the constructor runs before main, on one thread; `stdin`
        // is libc's variable, which programs may assign (glibc documents
        // it) and every stdio function reads. libc's own stream stays
        // open, unused, on the same descriptor.
        unsafe { *std::ptr::addr_of_mut!(stdin) = f };
    }
}
