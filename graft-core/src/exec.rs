//! How a launcher (`graft`, `docker-ns-exec`) reports a command it could not
//! exec, as shells do: status 126 when the command was found but may not be
//! run, 127 for anything else, and the reason without Rust's `(os error N)`.

use std::ffi::OsStr;
use std::io;

/// The exit status and the one-line message for a failed exec of `prog`.
pub fn failure(prog: &OsStr, err: &io::Error) -> (u8, String) {
    let code = if err.kind() == io::ErrorKind::PermissionDenied {
        126
    } else {
        127
    };
    let text = err.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    (
        code,
        format!("cannot run {}: {text}", prog.to_string_lossy()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_is_126_anything_else_127() {
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            failure(OsStr::new("./x"), &denied),
            (126, "cannot run ./x: Permission denied".to_owned())
        );
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            failure(OsStr::new("nope"), &missing),
            (127, "cannot run nope: No such file or directory".to_owned())
        );
    }
}
