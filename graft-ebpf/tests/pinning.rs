//! The pinned companion (what lets graftd restart without disarming the
//! policy): this test process plays successive graftds. Each start adopts
//! what the previous one pinned; dropping a companion leaves its programs
//! armed; pinned maps of another layout are refused; `remove_pinned` takes
//! everything away. Everything it makes is removed on drop, on failure too.

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::path::PathBuf;

use graft_core::{EndpointName, NetnsId};
use graft_ebpf::{remove_pinned, Companion, EndpointKey, Options};
use graft_tests::root_or_skip;

/// Moves the process back to where it came from and removes the pins and the
/// cgroup.
struct Cleanup {
    pin: PathBuf,
    cgroup: String,
    original: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(o) = &self.original {
            let _ = std::fs::write(o.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = remove_pinned(&self.pin, &self.cgroup);
    }
}

fn sendto(s: &UdpSocket, port: u16) -> Result<(), i32> {
    s.send_to(b"x", ("127.0.0.1", port))
        .map(|_| ())
        .map_err(|e| e.raw_os_error().unwrap_or(0))
}

#[test]
fn pinned_companion_outlives_its_process_and_is_adopted() {
    if !root_or_skip("pinned_companion") {
        return;
    }
    let tag = format!("graft-test-pin-{}", std::process::id());
    let mut guard = Cleanup {
        pin: PathBuf::from("/sys/fs/bpf").join(&tag),
        cgroup: tag.clone(),
        original: None,
    };
    let opts = Options {
        splice: false,
        cgroup_name: Some(tag.clone()),
        pin_dir: Some(guard.pin.clone()),
    };
    let mut c = match Companion::start(&opts) {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP: pinned_companion: eBPF companion unavailable: {e}");
            return;
        }
    };
    guard.original = Some(c.original_cgroup());
    let denied = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = denied.local_addr().unwrap().port();
    let k = EndpointKey {
        netns: NetnsId::current().unwrap(),
        name: EndpointName::new("ep-pin").unwrap(),
    };
    let policy = vec![format!("deny 127.0.0.1/32:{port}").parse().unwrap()];
    c.add_endpoint(k, &policy).unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.register_socket(s.as_fd(), &k).unwrap();
    assert_eq!(sendto(&s, port), Err(libc::EPERM));

    // No process holds the programs any more: still armed.
    drop(c);
    assert_eq!(
        sendto(&s, port),
        Err(libc::EPERM),
        "armed between two starts"
    );

    // The next start adopts the endpoint's id, counters and live count.
    let mut c = Companion::start(&opts).expect("second start");
    let n = c.counters(&k).expect("adopted endpoint");
    assert_eq!(n.policy_denied, 2);
    assert_eq!(c.live(&k), Some(1));
    c.add_endpoint(k, &policy).unwrap();
    let s2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.register_socket(s2.as_fd(), &k).unwrap();
    assert_eq!(sendto(&s2, port), Err(libc::EPERM));
    assert_eq!(sendto(&s, port), Err(libc::EPERM));
    drop(s2);
    assert_eq!(c.live(&k), Some(1), "the close was counted");
    drop(c);

    // A pinned map of another layout (another graft version) is refused,
    // and the programs already attached stay armed.
    let maps = guard.pin.join("maps");
    std::fs::remove_file(maps.join("graft_next_id")).unwrap();
    aya::maps::MapData::from_pin(maps.join("graft_global_map"))
        .unwrap()
        .pin(maps.join("graft_next_id"))
        .unwrap();
    let e = Companion::start(&opts).unwrap_err().to_string();
    assert!(
        e.contains("graft_next_id") && e.contains("made by another graft version"),
        "{e}"
    );
    assert_eq!(sendto(&s, port), Err(libc::EPERM));

    // Removal detaches everything.
    let original = guard.original.take().unwrap();
    std::fs::write(
        original.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap();
    let done = remove_pinned(&guard.pin, &tag).unwrap();
    assert!(
        done.iter().any(|l| l.starts_with("removed cgroup")),
        "{done:?}"
    );
    assert!(!guard.pin.exists());
    // The kernel frees an unpinned link from a work queue: soon, not at once.
    graft_tests::wait_until(
        "the programs to be detached after removal",
        std::time::Duration::from_secs(20),
        || sendto(&s, port).is_ok(),
    );
}
