"""The network paths measured side by side: each builds its namespaces,
servers and (graft rows) a private graftd, and says where a client runs and
what it dials."""

import os
import subprocess
import sys
import tempfile
import time

from .proc import RUN, RUNID, BenchError, kill_proc, nsx, proc_log, say, sh, spawn

SVC = {"iperf": 1, "pp": 2, "nginx": 3, "churn": 4, "nginx_out": 5}


class Path:
    name = "?"
    label = "?"
    base = 0
    baseline = "host"
    workloads = ("tcp1", "tcp4", "udp", "lat_pin", "lat", "ka", "close")

    def port(self, svc):
        return self.base + SVC[svc]

    # where clients run: list prefix (e.g. ["ip", "netns", "exec", ns]) or []
    def client(self):
        return []

    def target(self, svc):
        """Address:port a client dials for a service."""
        return "127.0.0.1", self.port(svc)

    def pp_pids(self):
        """Pids to pin for the pinned ping-pong cell (server side + relays)."""
        return [p.pid for p in getattr(self, "pp_procs", [])]

    def setup(self, h):
        pass

    def egress_client(self):
        """Prefix to run the churn client (None: no egress workload)."""
        return None

    def egress_argv(self, h, tool_args, pinned=False):
        return self.egress_client() + [h.bench] + tool_args

    def egress_nginx(self):
        """(addr, port, process) of the plain host nginx the wrk_out row's
        client dials (issue 10: an unmodified client through egress)."""
        return None


def start_servers(h, path, prefix, bind, name, wrap=None, services=("iperf", "pp", "nginx")):
    """Starts iperf3, the ping-pong server and nginx for one path."""
    wrap = wrap or (lambda svc, argv: argv)
    procs = {}
    if "iperf" in services:
        procs["iperf"] = spawn(prefix + wrap("iperf", ["iperf3", "-s", "-p", str(path.port("iperf")), "-B", bind]),
                               f"{name}-iperf3")
    if "pp" in services:
        procs["pp"] = spawn(prefix + wrap("pp", [h.bench, "server", "--listen", f"{bind}:{path.port('pp')}"]),
                            f"{name}-pp")
    if "nginx" in services:
        conf = h.nginx_conf(name, bind, path.port("nginx"))
        procs["nginx"] = spawn(prefix + wrap("nginx", ["nginx", "-c", conf, "-e", os.path.join(RUN.tmp, f"{name}-nginx.err")]),
                               f"{name}-nginx")
    path.pp_procs = [procs["pp"]] if "pp" in procs else []
    return procs


def wait_port(prefix, addr, port, what, limit=10.0):
    """Waits (bounded) until a TCP connect to addr:port succeeds from a netns."""
    code = ("import socket,sys,time\n"
            f"t=time.time()\n"
            f"while time.time()-t<{limit}:\n"
            f"  try:\n"
            f"    socket.create_connection(('{addr}',{port}),0.5).close(); sys.exit(0)\n"
            f"  except OSError: time.sleep(0.05)\n"
            "sys.exit(1)\n")
    p = subprocess.run(prefix + [sys.executable, "-c", code], capture_output=True, timeout=limit + 5)
    if p.returncode != 0:
        raise BenchError(f"{what}: nothing answers on {addr}:{port} after {limit}s")


def check_alive(procs, what):
    for k, p in procs.items():
        if p.poll() is not None:
            raise BenchError(f"{what}: {k} exited ({p.returncode}):\n{proc_log(p)}")


class HostPath(Path):
    name = "host"
    label = "host (loopback, no netfilter rules)"
    base = 21000
    workloads = Path.workloads + ("churn", "churn_pin", "wrk_out")
    nat = False

    def setup(self, h):
        self.ns = h.make_ns("h" if not self.nat else "hn")
        if self.nat:
            h.load_nat_ruleset(self.ns)
        pre = nsx(self.ns)
        self.procs = start_servers(h, self, pre, "127.0.0.1", self.name)
        self.procs["churn"] = spawn(pre + [h.bench, "server", "--once", "--listen", f"127.0.0.1:{self.port('churn')}"],
                                    f"{self.name}-churn")
        for s in ("iperf", "pp", "nginx", "churn"):
            wait_port(pre, "127.0.0.1", self.port(s), self.label)

    def client(self):
        return nsx(self.ns)

    def egress_client(self):
        return nsx(self.ns)

    def egress_nginx(self):
        return "127.0.0.1", self.port("nginx"), self.procs["nginx"]


class HostNatPath(HostPath):
    name = "host+nat"
    label = "host + Docker-like NAT ruleset (conntrack)"
    base = 21100
    nat = True


class BridgeHost:
    """One 'Docker host' namespace with a bridge and one container namespace
    attached by a veth pair; shared by the veth, DNAT and proxy paths (each
    with its own ports), like containers on one Docker host."""

    def __init__(self, h):
        self.h = h
        self.hns = h.make_ns("b")
        self.cns = h.make_ns("c")
        self.br = f"gb-br{RUNID}"
        hv, cv = f"gb-vh{RUNID}", f"gb-vc{RUNID}"
        self.hip, self.cip = "10.213.0.1", "10.213.0.2"
        H = ["ip", "-n", self.hns]
        sh(H + ["link", "add", self.br, "type", "bridge"])
        sh(H + ["addr", "add", f"{self.hip}/24", "dev", self.br])
        sh(H + ["link", "set", self.br, "up"])
        sh(H + ["link", "add", hv, "type", "veth", "peer", "name", cv, "netns", self.cns])
        sh(H + ["link", "set", hv, "master", self.br, "up"])
        C = ["ip", "-n", self.cns]
        sh(C + ["addr", "add", f"{self.cip}/24", "dev", cv])
        sh(C + ["link", "set", cv, "up"])
        sh(C + ["route", "add", "default", "via", self.hip])
        for k, v in (("net.ipv4.ip_forward", "1"),
                     (f"net.ipv4.conf.{self.br}.route_localnet", "1"),
                     ("net.bridge.bridge-nf-call-iptables", "1"),
                     ("net.bridge.bridge-nf-call-ip6tables", "1")):
            sh(nsx(self.hns) + ["sysctl", "-q", "-w", f"{k}={v}"])
        self.load_rules(DnatPath().dnat())

    def load_rules(self, dnat):
        """Docker's ruleset shape, in nft: DNAT for published ports (also from
        127.0.0.1, hence route_localnet), masquerade of local sources going to
        the bridge, and the stateful FORWARD accept."""
        lines = [f"table ip gbdock{RUNID} {{",
                 "  chain gb_prerouting {", "    type nat hook prerouting priority -100; policy accept;",
                 "    fib daddr type local jump gb_publish", "  }",
                 "  chain gb_output {", "    type nat hook output priority -100; policy accept;",
                 "    fib daddr type local jump gb_publish", "  }",
                 "  chain gb_publish {"]
        for proto, port in dnat:
            lines.append(f"    {proto} dport {port} dnat to {self.cip}:{port}")
        lines += ["  }",
                  "  chain gb_postrouting {", "    type nat hook postrouting priority 100; policy accept;",
                  f"    oifname \"{self.br}\" fib saddr type local masquerade",
                  f"    ip saddr 10.213.0.0/24 oifname != \"{self.br}\" masquerade", "  }",
                  "  chain gb_forward {", "    type filter hook forward priority 0; policy drop;",
                  "    ct state established,related accept",
                  f"    oifname \"{self.br}\" accept", f"    iifname \"{self.br}\" accept", "  }",
                  "}"]
        sh(nsx(self.hns) + ["nft", "-f", "-"], input="\n".join(lines) + "\n")


class BridgePath(Path):
    """Servers in the bridge host's container namespace, clients in its
    "Docker host" namespace."""

    def start_bridge_servers(self, h):
        self.b = h.bridge()
        self.procs = start_servers(h, self, nsx(self.b.cns), "0.0.0.0", self.name)
        return self.b

    def wait_servers(self, addr):
        """Until the container's iperf3, ping-pong and nginx answer on
        `addr` from the host namespace."""
        for s in ("iperf", "pp", "nginx"):
            wait_port(nsx(self.b.hns), addr, self.port(s), self.label)

    def client(self):
        return nsx(self.b.hns)


class VethPath(BridgePath):
    name = "veth"
    label = "veth+bridge (container address)"
    base = 21200
    baseline = "host"
    workloads = Path.workloads + ("churn", "churn_pin")

    def setup(self, h):
        b = self.start_bridge_servers(h)
        self.procs["churn"] = spawn(nsx(b.hns) + [h.bench, "server", "--once", "--listen", f"0.0.0.0:{self.port('churn')}"],
                                    f"{self.name}-churn")
        self.wait_servers(b.cip)

    def target(self, svc):
        if svc == "churn":
            return self.b.hip, self.port(svc)
        return self.b.cip, self.port(svc)

    def egress_client(self):
        return nsx(self.b.cns)


class DnatPath(BridgePath):
    name = "dnat"
    label = "bridge+DNAT from 127.0.0.1 (docker -p, no proxy)"
    base = 21300

    def setup(self, h):
        self.start_bridge_servers(h)
        self.wait_servers("127.0.0.1")

    def dnat(self):
        return [("tcp", self.port(s)) for s in ("iperf", "pp", "nginx")] + [("udp", self.port("iperf"))]


class ProxyPath(BridgePath):
    name = "proxy"
    label = "userland proxy on 127.0.0.1 (graft-bench relay, splice)"
    base = 21400
    workloads = ("tcp1", "tcp4", "lat_pin", "lat", "ka", "close")

    def relay(self, h, port):
        return [h.bench, "relay", "--listen", f"127.0.0.1:{port}", "--upstream", f"{self.b.cip}:{port}"]

    def setup(self, h):
        b = self.start_bridge_servers(h)
        self.relays = []
        for s in ("iperf", "pp", "nginx"):
            wait_port(nsx(b.hns), b.cip, self.port(s), self.label)
            r = spawn(nsx(b.hns) + self.relay(h, self.port(s)), f"{self.name}-relay-{s}")
            self.relays.append(r)
            if s == "pp":
                self.pp_procs.append(r)
        self.wait_servers("127.0.0.1")


class SocatPath(ProxyPath):
    name = "socat"
    label = "socat proxy on 127.0.0.1 (fork per connection)"
    base = 21500

    def relay(self, h, port):
        return ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay",
                f"TCP:{self.b.cip}:{port},nodelay"]


class GraftPath(Path):
    """Servers in a namespace with only loopback, under `graft`; endpoints in
    a host-like namespace where a private graftd runs (its own netns is the
    default target, so the grafted sockets live exactly where the `host`
    path's sockets live)."""
    name = "graft"
    label = "graft (servers in a loopback-only netns)"
    base = 21600
    workloads = Path.workloads + ("churn", "churn_pin", "wrk_out")
    host_path = "host"
    ns_tag = "g"
    graftd_args = ()
    # extra launcher options (the seccomp row forces its mode)
    graft_opts = ()
    # another build's binaries (graft-cmp, see --compare); None: the run's
    bin_dir = None

    def setup(self, h):
        hp = h.paths_by_name.get(self.host_path)
        if hp is None:
            raise BenchError(f"needs the `{self.host_path}` path, which is not set up")
        self.hns = hp.ns
        self.gns = h.make_ns(self.ns_tag)
        self.d = h.graftd(self.hns, self.name, self.graftd_args, self.bin_dir)
        eps = {"iperf": "ep-ip", "pp": "ep-pp", "nginx": "ep-ng"}
        for s, ep in eps.items():
            self.d.add(nsx(self.gns), f"{ep} type ipv4 addr 127.0.0.1 port {self.port(s)}")
        self.d.add(nsx(self.gns), "ep-out4 type ipv4 addr 0.0.0.0 port dynamic")
        self.d.ip_graft(nsx(self.gns), ["show"])

        def wrap(svc, argv):
            return [self.d.bin("graft"), *self.graft_opts, "-i", f"0.0.0.0:{self.port(svc)}={eps[svc]}",
                    "--"] + argv
        self.wrap = wrap
        self.procs = start_servers(h, self, self.d.envx(nsx(self.gns)), "0.0.0.0", self.name, wrap=wrap)
        self.procs["churn"] = spawn(nsx(self.hns) + [h.bench, "server", "--once", "--listen", f"127.0.0.1:{self.port('churn')}"],
                                    f"{self.name}-churn")
        if "wrk_out" in self.workloads:
            # a plain host nginx of this path's own for the wrk_out row
            conf = h.nginx_conf(f"{self.name}-out", "127.0.0.1", self.port("nginx_out"))
            self.procs["nginx_out"] = spawn(nsx(self.hns) + ["nginx", "-c", conf, "-e",
                                                             os.path.join(RUN.tmp, f"{self.name}-out-nginx.err")],
                                            f"{self.name}-nginx-out")
            wait_port(nsx(self.hns), "127.0.0.1", self.port("nginx_out"), self.label)
        for s in ("iperf", "pp", "nginx", "churn"):
            try:
                wait_port(nsx(self.hns), "127.0.0.1", self.port(s), self.label)
            except BenchError as e:
                check_alive(self.procs, self.label)
                raise BenchError(f"{e}\ngraftd log:\n{self.d.log_text()}")

    def client(self):
        return nsx(self.hns)

    def egress_client(self):
        return self.d.envx(nsx(self.gns)) + [self.d.bin("graft"), *self.graft_opts, "-e",
                                             "0.0.0.0/0=ep-out4", "--"]

    def egress_nginx(self):
        p = self.procs.get("nginx_out")
        return ("127.0.0.1", self.port("nginx_out"), p) if p else None


class GraftComparePath(GraftPath):
    """`graft`'s rows with the binaries of another build (bench/run
    --compare DIR), measured in the same run, cell after cell with this
    build's `graft`: on a machine whose speed drifts, the one way to tell
    two builds apart."""
    name = "graft-cmp"
    label = "graft with the binaries of --compare (another build)"
    base = 23000
    ns_tag = "gc"


class GraftHostNoSplicePath(GraftPath):
    """`graft` with `graftd --no-splice`: the same rows, every peer a host
    socket, so nothing is spliced in `graft` either; shows what splicing,
    on by default, costs where it does not apply (churn, egress, a grafted
    server's host clients)."""
    name = "graft-nosplice"
    label = "graft with `graftd --no-splice` (host peers: nothing to splice)"
    base = 22900
    ns_tag = "gsp"
    graftd_args = ("--no-splice",)


class GraftSeccompPath(GraftPath):
    """`graft` as for a static program: `--mode seccomp` (the servers and the
    churn client are the same dynamic binaries, forced onto the seccomp
    path, so the row isolates its cost)."""
    name = "graft-seccomp"
    label = "graft --mode seccomp (seccomp user notification)"
    base = 22500
    ns_tag = "gsec"
    graft_opts = ("--mode", "seccomp")


class GraftSeccompCgroupPath(GraftSeccompPath):
    """`graft-seccomp`'s egress rows with the client in a cgroup v2 of its
    own, as a container's or a systemd unit's: graftd's eBPF companion then
    records which options the program sets on its sockets, and a trapped
    connect reads those instead of every carried option."""
    name = "graft-seccomp-cg"
    label = "graft --mode seccomp, client in a cgroup of its own"
    base = 22700
    ns_tag = "gscg"
    workloads = ("churn", "churn_pin", "wrk_out")

    def setup(self, h):
        super().setup(h)
        # choose_paths leaves this path out when there is no mount.
        self.cg = os.path.join(cgroup2_mount() or "/sys/fs/cgroup", f"gb-{self.name}-{os.getpid()}")
        os.mkdir(self.cg)
        RUN.cleanups.append(lambda: remove_cgroup(self.cg))

    def egress_client(self):
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.cg] + super().egress_client()


def cgroup2_mount():
    """Where the cgroup v2 hierarchy is mounted, if it is."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.startswith("cgroup2 "):
                return pre.split()[4]
    return None


def remove_cgroup(path):
    """Removes a cgroup once the processes in it are gone (bounded)."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    say(f"cleanup: cgroup {path} left behind")


class GraftG2GPath(GraftPath):
    """Both ends grafted: servers as in `graft`, the client in a second
    loopback-only namespace under `graft -e`; graftd splices such pairs by
    default (eBPF sk_msg redirect)."""
    name = "graft-g2g"
    label = "graft↔graft (client grafted too), spliced (the default)"
    base = 22300
    ns_tag = "gg"
    workloads = Path.workloads

    def setup(self, h):
        super().setup(h)
        self.cns = h.make_ns(self.ns_tag + "c")
        self.d.add(nsx(self.cns), "ep-out4 type ipv4 addr 0.0.0.0 port dynamic")

    def client(self):
        return self.d.envx(nsx(self.cns)) + [self.d.bin("graft"), "-e", "0.0.0.0/0=ep-out4", "--"]


class GraftG2GComparePath(GraftG2GPath):
    """`graft-g2g`'s rows with the binaries of another build (bench/run
    --compare DIR), as `graft-cmp` is to `graft`."""
    name = "graft-g2g-cmp"
    label = "graft↔graft with the binaries of --compare (another build)"
    base = 23100
    ns_tag = "ggm"


class GraftNoSplicePath(GraftG2GPath):
    name = "graft-g2g-nosplice"
    label = "graft↔graft with `graftd --no-splice` (plain TCP)"
    base = 22400
    ns_tag = "gs"
    graftd_args = ("--no-splice",)


class GraftNatPath(GraftPath):
    name = "graft+nat"
    label = "graft, host side with the NAT ruleset"
    ns_tag = "gn"
    base = 21700
    host_path = "host+nat"
    baseline = "host+nat"


ALL_PATHS = [HostPath, HostNatPath, VethPath, DnatPath, ProxyPath, SocatPath, GraftPath, GraftComparePath, GraftNatPath,
             GraftG2GPath, GraftG2GComparePath, GraftNoSplicePath, GraftHostNoSplicePath, GraftSeccompPath, GraftSeccompCgroupPath]


class Graftd:
    def __init__(self, h, ns, tag, extra=(), bin_dir=None):
        self.h = h
        self.bin_dir = bin_dir
        self.dir = tempfile.mkdtemp(prefix=f"gb-graftd-{tag.replace('+', '')}-", dir=RUN.tmp)
        self.control = os.path.join(self.dir, "graftd.sock")
        self.broker = f"gb-bench/{RUNID}/{tag}"
        env = dict(os.environ, RUST_LOG=os.environ.get("GB_GRAFTD_LOG", "info"))
        # nsenter, not `ip netns exec`: the latter remounts /sys, which hides
        # the cgroup2 mount graftd needs for its eBPF companion
        enter = ["nsenter", f"--net=/run/netns/{ns}"] if ns else []
        # private state, bpffs pins and cgroup, removed at teardown
        uniq = os.path.basename(self.dir)
        self.own = ["--control", self.control, "--broker-name", self.broker,
                    "--state-dir", os.path.join(self.dir, "state"),
                    "--pin-dir", f"/sys/fs/bpf/{uniq}", "--cgroup", uniq]
        self.p = spawn(enter + [self.bin("graftd")] + self.own + list(extra), f"graftd-{tag}", env=env)
        RUN.cleanups.append(self.remove)
        t = time.time()
        while not os.path.exists(self.control):
            if self.p.poll() is not None or time.time() - t > 10:
                raise BenchError(f"graftd ({tag}) did not create its control socket:\n{proc_log(self.p)}")
            time.sleep(0.05)

    def remove(self):
        """Stops this graftd and removes its pinned eBPF companion and cgroup."""
        kill_proc(self.p)
        subprocess.run([self.bin("graftd")] + self.own + ["--remove"],
                       capture_output=True, timeout=30)

    def bin(self, name):
        """graft's binary `name` of this graftd's build."""
        return self.h.graft_bin(name, self.bin_dir)

    def envx(self, prefix):
        """A command prefix that runs in `prefix` with this graftd's environment."""
        return prefix + ["env", f"GRAFT_CONTROL={self.control}", f"GRAFT_BROKER={self.broker}"]

    def ip_graft(self, prefix, args):
        return sh(self.envx(prefix) + [self.bin("ip-graft")] + args)

    def add(self, prefix, spec):
        """`ip graft add SPEC` (SPEC as typed, split on blanks) in `prefix`."""
        return self.ip_graft(prefix, ["add"] + spec.split())

    def log_text(self):
        return proc_log(self.p)

