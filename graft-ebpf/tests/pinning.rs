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

mod common;
use common::Cleanup;

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
    // (A missing pin is made anew: only the next check is left to fail.)
    std::fs::remove_file(maps.join("graft_next_id")).unwrap();

    // So is one of the same sizes but another kind (per-CPU counters).
    let counters = maps.join("graft_counters_map");
    std::fs::remove_file(&counters).unwrap();
    pin_new_map(&counters, BPF_MAP_TYPE_PERCPU_HASH, 4, 72, 4096);
    let e = Companion::start(&opts).unwrap_err().to_string();
    assert!(
        e.contains("graft_counters_map") && e.contains("made by another graft version"),
        "{e}"
    );

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

const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;

/// Pins a new map of type `kind` and the given sizes at `path`.
fn pin_new_map(path: &std::path::Path, kind: u32, key: u32, value: u32, entries: u32) {
    // union bpf_attr for BPF_MAP_CREATE: type, key, value, entries, flags.
    let mut attr = [0u32; 30];
    attr[..5].copy_from_slice(&[kind, key, value, entries, 0]);
    // SAFETY: attr is a zeroed bpf_attr large enough for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // union bpf_attr for BPF_OBJ_PIN: pathname (u64), bpf_fd (u32).
    let mut pin = [0u64; 3];
    pin[0] = c.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: pin is a bpf_attr for BPF_OBJ_PIN naming a live path and fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            pin.as_mut_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: the map fd is ours; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}
