//! Mutation fuzzing of the decoders graftd runs on untrusted bytes.
//!
//! cargo-fuzz needs a nightly toolchain this project cannot install, so this
//! stable-Rust test does the same job in a bounded, repeatable way: it starts
//! from valid records, applies seeded random mutations (bit flips, byte
//! overwrites, truncation, extension, splicing), and checks that every decoder
//! returns instead of panicking, and that whatever it accepts re-encodes to a
//! record it accepts again (decoding is strict: nothing is accepted that the
//! encoder could not have produced).

use graft_core::proto::{broker, control};
use graft_core::EndpointName;

/// xorshift64*: deterministic, so a failure reproduces from its iteration.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => b.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            4 if b.len() >= 4 => {
                // Interesting integers in a random aligned slot.
                let i = rng.below(b.len() / 4) * 4;
                let v: [u32; 6] = [0, 1, 15, 16, 64, u32::MAX];
                b[i..i + 4].copy_from_slice(&v[rng.below(v.len())].to_le_bytes());
            }
            _ => {
                let i = rng.below(b.len() + 1);
                b.insert(i, rng.next() as u8);
            }
        }
    }
    b
}

#[test]
fn broker_request_decoder_survives_mutations() {
    let mut req = broker::Request::new(
        broker::Op::Socket,
        EndpointName::new("ep-in4").expect("valid name"),
        libc::AF_INET6,
        libc::SOCK_STREAM,
        0,
        broker::Purpose::Egress,
    );
    assert!(req.push_opt(libc::SOL_SOCKET, libc::SO_REUSEPORT, &1i32.to_le_bytes()));
    assert!(req.push_opt(
        libc::IPPROTO_TCP,
        libc::TCP_CONGESTION,
        b"cubic\0\0\0\0\0\0\0\0\0\0\0"
    ));
    let mut seed = [0u8; broker::REQUEST_LEN];
    req.encode(&mut seed);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for _ in 0..200_000 {
        let m = mutate(&mut rng, &seed);
        if let Ok(r) = broker::Request::decode(&m) {
            accepted += 1;
            let mut again = [0u8; broker::REQUEST_LEN];
            r.encode(&mut again);
            assert_eq!(
                &again[..],
                &m[..],
                "accepted bytes must be exactly the canonical encoding"
            );
        }
    }
    // Some mutations (e.g. of option values) stay valid; most must not.
    assert!(accepted > 0 && accepted < 200_000, "accepted {accepted}");
}

#[test]
fn broker_socket_batch_decoder_survives_mutations() {
    let req = broker::Request::new(
        broker::Op::SocketBatch,
        EndpointName::new("ep-out4").expect("valid name"),
        libc::AF_INET,
        libc::SOCK_STREAM,
        0,
        broker::Purpose::Egress,
    );
    let mut seed = [0u8; broker::REQUEST_LEN];
    req.encode(&mut seed);
    let mut rng = Rng(0x5eed_ba7c);
    for _ in 0..100_000 {
        let m = mutate(&mut rng, &seed);
        if let Ok(r) = broker::Request::decode(&m) {
            if r.op == broker::Op::SocketBatch {
                assert_eq!((r.purpose, r.nopts), (broker::Purpose::Egress, 0));
            }
            let mut again = [0u8; broker::REQUEST_LEN];
            r.encode(&mut again);
            assert_eq!(&again[..], &m[..], "canonical encoding");
        }
    }
}

#[test]
fn broker_attach_decoder_survives_mutations() {
    let a = broker::Attach {
        listener_fd: 4,
        flags: broker::ATTACH_VERBOSE,
        ingress: "0.0.0.0:0-65535=ep-in4 :::80=ep-in6".into(),
        egress: "0.0.0.0/0=ep-out4".into(),
        exclude: "10.0.0.0/8".into(),
    };
    let mut seed = [0u8; broker::REQUEST_LEN];
    a.encode(&mut seed).expect("fits");
    let mut rng = Rng(0xa77a_c4ed);
    let mut accepted = 0;
    for _ in 0..100_000 {
        let m = mutate(&mut rng, &seed);
        assert!(broker::Request::decode(&m).is_err() || m[6] != 6);
        if let Ok(d) = broker::Attach::decode(&m) {
            accepted += 1;
            d.rules().expect("accepted rules parse");
            let mut again = [0u8; broker::REQUEST_LEN];
            d.encode(&mut again).expect("fits");
            assert_eq!(&again[..], &m[..], "canonical encoding");
        }
    }
    assert!(accepted < 100_000, "accepted {accepted}");
}

#[test]
fn broker_reply_decoder_survives_mutations() {
    let mut seed = [0u8; broker::REPLY_LEN];
    broker::Reply::ok(broker::Op::Socket, &[2, 0, 0x1f, 0x90, 127, 0, 0, 1]).encode(&mut seed);
    let mut rng = Rng(42);
    for _ in 0..100_000 {
        let m = mutate(&mut rng, &seed);
        if let Ok(r) = broker::Reply::decode(&m) {
            assert!(r.addr_bytes().len() <= broker::ADDR_MAX);
        }
    }
}

/// Mutations of `seeds` that still decode as control requests encode and
/// decode again to the same request.
fn control_requests_round_trip(seeds: &[&[u8]], mut rng: Rng) {
    for i in 0..100_000 {
        let m = mutate(&mut rng, seeds[i % seeds.len()]);
        if let Ok(r) = control::decode_request(&m) {
            let again = control::encode(&r);
            assert_eq!(control::decode_request(&again).expect("re-decodes"), r);
        }
    }
}

#[test]
fn control_request_decoder_survives_mutations() {
    let seeds: [&[u8]; 4] = [
        br#"{"op":"add","endpoint":{"name":"ep-in4","addr":{"type":"ipv4","addr":"127.0.0.1","port":8080},"netns":"1","policy":["allow 10.0.0.0/8:80-443"]},"target_fd":true}"#,
        br#"{"op":"del","name":"ep-out6"}"#,
        br#"{"op":"show"}"#,
        br#"{"op":"add","endpoint":{"name":"u","addr":{"type":"unix","path":"/run/x.sock"},"netns":null},"target_fd":false}"#,
    ];
    control_requests_round_trip(&seeds, Rng(7));
}

#[test]
fn broker_rules_request_decoder_survives_mutations() {
    let mut seed = [0u8; broker::REQUEST_LEN];
    broker::Request::rules().encode(&mut seed);
    let mut rng = Rng(0x0a11_5eed);
    for _ in 0..100_000 {
        let m = mutate(&mut rng, &seed);
        if let Ok(r) = broker::Request::decode(&m) {
            if r.op == broker::Op::Rules {
                assert_eq!(r, broker::Request::rules());
            }
            let mut again = [0u8; broker::REQUEST_LEN];
            r.encode(&mut again);
            assert_eq!(&again[..], &m[..], "canonical encoding");
        }
    }
}

#[test]
fn rules_blob_decoder_survives_mutations() {
    let seeds: [&[u8]; 3] = [
        b"[::]:80=ep-in6 0.0.0.0:8000-8080=ep-in4\n0.0.0.0/0=ep-out4 ::/0=ep-out6\n10.0.0.0/8\n",
        b"\n\n\n",
        b"127.0.0.1:80=a\n\n\n",
    ];
    let mut rng = Rng(0xb10b);
    for i in 0..100_000 {
        let m = mutate(&mut rng, seeds[i % seeds.len()]);
        if let Ok(r) = graft_core::nsrules::NsRules::from_blob(&m) {
            assert_eq!(r.to_blob(), m, "canonical encoding");
        }
    }
}

#[test]
fn control_rules_request_decoder_survives_mutations() {
    let seeds: [&[u8]; 2] = [
        br#"{"op":"setrules","rules":{"ingress":["0.0.0.0:80=ep-in4"],"egress":["::/0=ep-out6"],"exclude":["10.0.0.0/8"]}}"#,
        br#"{"op":"getrules"}"#,
    ];
    control_requests_round_trip(&seeds, Rng(11));
}
