//! Just enough ELF to know whether the dynamic loader (and so `LD_PRELOAD`)
//! will take part in running a program: a program is dynamically linked when
//! it has a `PT_INTERP` program header. A static-pie binary has `PT_DYNAMIC`
//! but no interpreter, and ignores `LD_PRELOAD` like any static one.
//!
//! Only 64-bit little-endian files are parsed; anything else is `Unknown`
//! and the launcher does not warn.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use graft_core::le::{u16_at, u32_at, u64_at};

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_INTERP: u32 = 3;
/// More program headers than any real program has; beyond it we give up
/// rather than read an attacker-sized table.
const MAX_PHNUM: usize = 1024;

/// How a program file is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    /// ELF with an interpreter: `LD_PRELOAD` applies.
    Dynamic,
    /// ELF without an interpreter: `LD_PRELOAD` is ignored.
    Static,
    /// A `#!` script; the kernel runs this interpreter, whose linkage is given.
    Script(PathBuf, Box<Linkage>),
    /// Not something we parse (32-bit, big-endian, truncated, not ELF).
    Unknown,
}

/// Where the program header table is, from an ELF header: `(offset, count)`,
/// or `None` when the header is not one we parse.
pub fn program_headers(ehdr: &[u8]) -> Option<(u64, usize)> {
    if ehdr.len() < EHDR_LEN || &ehdr[..4] != b"\x7fELF" {
        return None;
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return None;
    }
    let phoff = u64_at(ehdr, 0x20);
    let phentsize = usize::from(u16_at(ehdr, 0x36));
    let phnum = usize::from(u16_at(ehdr, 0x38));
    // 0xffff means the real count lives in a section header: not worth it.
    if phentsize != PHDR_LEN || phnum == 0 || phnum > MAX_PHNUM {
        return None;
    }
    Some((phoff, phnum))
}

/// Whether a program header table holds `PT_INTERP`.
pub fn has_interp(phdrs: &[u8]) -> bool {
    phdrs
        .chunks_exact(PHDR_LEN)
        .any(|ph| u32_at(ph, 0) == PT_INTERP)
}

/// The interpreter of a `#!` line (its first word), if `head` starts with one.
pub fn shebang(head: &[u8]) -> Option<PathBuf> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let word = line
        .split(|&b| b == b' ' || b == b'\t')
        .find(|w| !w.is_empty())?;
    use std::os::unix::ffi::OsStrExt;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(word)))
}

fn inspect_file(path: &Path, follow_script: bool) -> io::Result<Linkage> {
    let mut f = File::open(path)?;
    let mut head = [0u8; 256];
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = &head[..n];
    if let Some(interp) = shebang(head) {
        if !follow_script {
            return Ok(Linkage::Unknown);
        }
        let inner = inspect_file(&interp, false).unwrap_or(Linkage::Unknown);
        return Ok(Linkage::Script(interp, Box::new(inner)));
    }
    let Some((phoff, phnum)) = program_headers(head) else {
        return Ok(Linkage::Unknown);
    };
    let mut phdrs = vec![0u8; phnum * PHDR_LEN];
    f.seek(SeekFrom::Start(phoff))?;
    if f.read_exact(&mut phdrs).is_err() {
        return Ok(Linkage::Unknown);
    }
    Ok(if has_interp(&phdrs) {
        Linkage::Dynamic
    } else {
        Linkage::Static
    })
}

/// How `path` would be run (following one level of `#!`).
pub fn inspect(path: &Path) -> io::Result<Linkage> {
    inspect_file(path, true)
}

/// Longest interpreter path read from `PT_INTERP`.
const INTERP_MAX: u64 = 4096;

/// The program interpreter (`PT_INTERP`) of an ELF file, e.g.
/// `/lib64/ld-linux-x86-64.so.2` for glibc, `/lib/ld-musl-x86_64.so.1` for
/// musl; `None` for a static or unparsed file.
pub fn interpreter(path: &Path) -> io::Result<Option<PathBuf>> {
    let mut f = File::open(path)?;
    let mut head = [0u8; EHDR_LEN];
    if f.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let Some((phoff, phnum)) = program_headers(&head) else {
        return Ok(None);
    };
    let mut phdrs = vec![0u8; phnum * PHDR_LEN];
    f.seek(SeekFrom::Start(phoff))?;
    if f.read_exact(&mut phdrs).is_err() {
        return Ok(None);
    }
    let Some(ph) = phdrs
        .chunks_exact(PHDR_LEN)
        .find(|ph| u32_at(ph, 0) == PT_INTERP)
    else {
        return Ok(None);
    };
    let (off, size) = (u64_at(ph, 8), u64_at(ph, 32));
    if size == 0 || size > INTERP_MAX {
        return Ok(None);
    }
    let mut name = vec![0u8; size as usize];
    f.seek(SeekFrom::Start(off))?;
    if f.read_exact(&mut name).is_err() {
        return Ok(None);
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    use std::os::unix::ffi::OsStrExt;
    Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(
        &name[..end],
    ))))
}

/// Whether an interpreter is glibc's dynamic loader (which honours
/// `LD_PRELOAD` the way libgraft-convert needs).
pub fn is_glibc_loader(interp: &Path) -> bool {
    interp
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ld-linux") || n.starts_with("ld64.so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit LE ELF image: header plus program headers of the
    /// given types, right after the header.
    fn image(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_LEN];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[0x20..0x28].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = [0u8; PHDR_LEN];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b
    }

    fn classify(bytes: &[u8]) -> Linkage {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("graft-elf-test-{}-{n}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        let l = inspect(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        l
    }

    #[test]
    fn synthetic_images() {
        // PT_PHDR, PT_INTERP, PT_LOAD, PT_DYNAMIC
        assert_eq!(classify(&image(&[6, 3, 1, 2])), Linkage::Dynamic);
        // static-pie: PT_LOAD + PT_DYNAMIC, no interpreter
        assert_eq!(classify(&image(&[1, 1, 2])), Linkage::Static);
        let mut be = image(&[3]);
        be[5] = 2;
        assert_eq!(classify(&be), Linkage::Unknown, "big-endian is skipped");
        let mut b32 = image(&[3]);
        b32[4] = 1;
        assert_eq!(classify(&b32), Linkage::Unknown, "32-bit is skipped");
        let mut cut = image(&[1, 3]);
        cut.truncate(EHDR_LEN + 10);
        assert_eq!(classify(&cut), Linkage::Unknown, "truncated table");
        let mut huge = image(&[3]);
        huge[0x38..0x3a].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(classify(&huge), Linkage::Unknown);
        assert_eq!(classify(b"hello"), Linkage::Unknown);
        assert_eq!(classify(b""), Linkage::Unknown);
    }

    #[test]
    fn shebang_lines() {
        assert_eq!(shebang(b"#!/bin/sh -e\nx"), Some("/bin/sh".into()));
        assert_eq!(
            shebang(b"#! /usr/bin/env python3\n"),
            Some("/usr/bin/env".into())
        );
        assert_eq!(shebang(b"#!\n"), None);
        assert_eq!(shebang(b"\x7fELF"), None);
        let l = classify(b"#!/bin/sh\necho hi\n");
        assert_eq!(
            l,
            Linkage::Script("/bin/sh".into(), Box::new(Linkage::Dynamic))
        );
    }

    #[test]
    fn interpreters() {
        let sh = interpreter(Path::new("/bin/sh")).unwrap().unwrap();
        assert!(is_glibc_loader(&sh), "{}", sh.display());
        assert!(!is_glibc_loader(Path::new("/lib/ld-musl-x86_64.so.1")));
        let ldconfig = Path::new("/sbin/ldconfig");
        if ldconfig.exists() {
            assert_eq!(interpreter(ldconfig).unwrap(), None);
        }
    }

    #[test]
    fn real_programs() {
        // Debian's sh is dynamically linked; ldconfig is static in glibc builds.
        assert_eq!(inspect(Path::new("/bin/sh")).unwrap(), Linkage::Dynamic);
        let ldconfig = Path::new("/sbin/ldconfig");
        if ldconfig.exists() {
            assert_eq!(inspect(ldconfig).unwrap(), Linkage::Static);
        }
    }
}
