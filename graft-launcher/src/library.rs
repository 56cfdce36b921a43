//! Finding libgraft-convert.so and putting it in front of `LD_PRELOAD`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Environment variable naming the library explicitly.
pub const ENV_LIBRARY: &str = "GRAFT_LIBRARY";

/// File names the library has next to the launcher: the installed name, then
/// the one cargo gives it in `target/debug`/`target/release`.
const NAMES: [&str; 2] = ["libgraft-convert.so", "libgraft_convert.so"];

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("{ENV_LIBRARY}={0}: no such file")]
    Override(String),
    #[error("cannot find the preload library: looked for {tried} (set {ENV_LIBRARY} to its path)")]
    NotFound { tried: String },
}

/// Where the library is: `$GRAFT_LIBRARY` when set, else next to the
/// launcher's own executable, else in `../lib/graft/` relative to its
/// directory (the `make install` layout: `/usr/local/bin/graft`,
/// `/usr/local/lib/graft/libgraft-convert.so`). The result is absolute, because the dynamic loader
/// would resolve a relative `LD_PRELOAD` entry against the program's working
/// directory.
pub fn find(override_: Option<OsString>, exe: &Path) -> Result<PathBuf, LibraryError> {
    if let Some(p) = override_.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return std::fs::canonicalize(&p)
            .ok()
            .filter(|c| c.is_file())
            .ok_or_else(|| LibraryError::Override(p.display().to_string()));
    }
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates: Vec<PathBuf> = NAMES
        .iter()
        .map(|n| dir.join(n))
        .chain(
            dir.parent()
                .map(|prefix| prefix.join("lib/graft").join(NAMES[0])),
        )
        .collect();
    for c in &candidates {
        if c.is_file() {
            // canonicalize only fails for a path that vanished in between.
            return Ok(std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()));
        }
    }
    Err(LibraryError::NotFound {
        tried: candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The new `LD_PRELOAD`: the library first, then every existing entry (the
/// loader accepts ':' and ' ' as separators), without a second copy of the
/// library.
pub fn ld_preload(lib: &Path, existing: Option<&OsStr>) -> OsString {
    let mut out = lib.as_os_str().as_bytes().to_vec();
    if let Some(old) = existing {
        for entry in old
            .as_bytes()
            .split(|&b| b == b':' || b == b' ')
            .filter(|e| !e.is_empty())
        {
            if entry != lib.as_os_str().as_bytes() {
                out.push(b':');
                out.extend_from_slice(entry);
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepends_and_keeps_existing_entries() {
        let lib = Path::new("/usr/local/lib/graft/libgraft-convert.so");
        assert_eq!(ld_preload(lib, None), lib.as_os_str());
        assert_eq!(ld_preload(lib, Some(OsStr::new(""))), lib.as_os_str());
        assert_eq!(
            ld_preload(lib, Some(OsStr::new("/a.so:/b.so /c.so"))),
            OsString::from("/usr/local/lib/graft/libgraft-convert.so:/a.so:/b.so:/c.so")
        );
        assert_eq!(
            ld_preload(
                lib,
                Some(OsStr::new("/usr/local/lib/graft/libgraft-convert.so:/a.so"))
            ),
            OsString::from("/usr/local/lib/graft/libgraft-convert.so:/a.so"),
            "no second copy"
        );
    }

    #[test]
    fn search_order() {
        let d = std::env::temp_dir().join(format!("graft-lib-test-{}", std::process::id()));
        let bin = d.join("bin");
        let lib = d.join("lib/graft");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&lib).unwrap();
        let exe = bin.join("graft");
        let e = find(None, &exe).unwrap_err().to_string();
        assert!(
            e.contains("libgraft_convert.so") && e.contains(ENV_LIBRARY),
            "{e}"
        );
        std::fs::write(lib.join("libgraft-convert.so"), b"").unwrap();
        let c = std::fs::canonicalize(&d).unwrap();
        assert_eq!(
            find(None, &exe).unwrap(),
            c.join("lib/graft/libgraft-convert.so")
        );
        std::fs::write(bin.join("libgraft_convert.so"), b"").unwrap();
        assert_eq!(find(None, &exe).unwrap(), c.join("bin/libgraft_convert.so"));
        std::fs::write(bin.join("libgraft-convert.so"), b"").unwrap();
        assert_eq!(find(None, &exe).unwrap(), c.join("bin/libgraft-convert.so"));
        let o = find(Some(lib.join("libgraft-convert.so").into()), &exe).unwrap();
        assert_eq!(o, c.join("lib/graft/libgraft-convert.so"));
        let e = find(Some("/nonexistent/x.so".into()), &exe).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GRAFT_LIBRARY=/nonexistent/x.so: no such file"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
