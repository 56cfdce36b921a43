//! systemd's readiness protocol, by hand: one datagram to `$NOTIFY_SOCKET`
//! (a path, or an abstract name written with a leading `@`). Nothing happens
//! when the variable is unset (graftd not run by systemd with Type=notify).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to systemd, if it asked for it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path.to_string_lossy(), state) {
        log::warn!("cannot notify systemd ({state}): {e}");
    }
}

fn send(path: &str, state: &str) -> io::Result<()> {
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(path)?,
    };
    let s = UnixDatagram::unbound()?;
    s.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("graftd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notify");
        let r = UnixDatagram::bind(&p).unwrap();
        send(&p.to_string_lossy(), "READY=1").unwrap();
        let mut b = [0u8; 32];
        let n = r.recv(&mut b).unwrap();
        assert_eq!(&b[..n], b"READY=1");
        let name = format!("graftd-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let a = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let r2 = UnixDatagram::bind_addr(&a).unwrap();
        send(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = r2.recv(&mut b).unwrap();
        assert_eq!(&b[..n], b"STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
