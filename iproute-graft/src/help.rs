//! `ip graft help`.

/// The usage text, printed to stdout by `ip graft help` (exit 0).
pub const HELP: &str = "\
Usage: ip [ OPTIONS ] graft { COMMAND | help }
       ip-graft [ OPTIONS ] [ graft ] { COMMAND | help }

       ip graft add NAME type { ipv4 | ipv6 } addr ADDR port { PORT | dynamic }
                    [ netns { PID | NETNSNAME | PATH } ]
                    [ allow PREFIX/LEN[:PORT[-PORT]] ]... [ deny PREFIX/LEN[:PORT[-PORT]] ]...
                    [ limit N ]
       ip graft add NAME type unix path PATH [ netns { PID | NETNSNAME | PATH } ]
       ip graft del NAME
       ip graft [ show | list ] [ NAME ]
       ip graft rules [ show ]
       ip graft rules set [ ingress ADDR:PORT[-PORT]=NAME ]... [ egress PREFIX/LEN=NAME ]...
                          [ exclude PREFIX/LEN ]...
       ip graft rules flush
       ip graft help

Where: NAME  := up to 15 bytes of letters, digits, '-', '_', '.'
       ADDR  := { IPv4_ADDRESS | IPv6_ADDRESS } (of the family the type names)
       PORT  := 0..65535 (0 is the same as dynamic)
       PATH  := an absolute unix socket path, in graftd's file system
       netns := where grafted sockets live (default: graftd's own namespace,
                normally the host): a PID, a name made by `ip netns add`, or a
                path to a namespace file
       allow/deny := egress policy of the endpoint, enforced in the kernel when
                graft-ebpf is loaded; longest prefix wins, deny wins a tie; with
                any allow clause, destinations no clause covers are denied
       limit := most live sockets handed out from the endpoint at once
                (1..1048576; default: graftd's --default-limit); one more is
                refused with ENOBUFS until one is closed; counted in the
                kernel by graft-ebpf (without it, an endpoint with a limit
                gets no sockets)

       rules := the namespace's own mapping rules, in the syntax of graft's -i, -e
                and -x; `graft -- CMD` run without those flags takes them. The
                namespace needs an endpoint first; its rules go with its last
                endpoint. `set` replaces all of them.

The endpoint table shown and changed is the one of the network namespace the
command runs in (e.g. `ip netns exec c1 ip graft add ...`).

OPTIONS := { -j[son] | -p[retty] | -s[tatistics] | -h[uman] | -d[etails] |
             -n[etns] NETNSNAME | -V[ersion] | -help }
  -s   counters under each endpoint: sockets (handed out), refused (requests
       refused); and, when graft-ebpf reports them: denied (connect/sendmsg
       refused by the policy), active/passive (TCP connections established),
       tx_bytes/rx_bytes, live (sockets handed out and still open) and
       limit
  -j   a JSON array, one object per endpoint (name, type, addr, port, path,
       netns, policy, target_netns, and stats with -s); -p pretty-prints it
  -d   the target namespace's identity (net:[INODE] and device)

Environment: GRAFT_CONTROL  graftd's control socket (default /run/graft/graftd.sock)

Exit status: 0 success; 2 bad input or a request graftd refused (name in use,
no such endpoint, ...), with one line on stderr; 1 graftd unreachable (not
running, not answering within 5 s, permission denied) or another system error.
";

#[cfg(test)]
mod tests {
    #[test]
    fn lines_fit_a_terminal() {
        for l in super::HELP.lines() {
            assert!(l.len() <= 100, "{l}");
        }
    }
}
