"""The harness the paths are built with, and where the binaries come from."""

import os

from .paths import BridgeHost, Graftd
from .proc import ROOT, RUN, RUNID, BenchError, nsx, say, sh


class Harness:
    """What the paths share: graft-bench and graft's binaries, the Docker
    image, namespaces, nginx configurations, the bridge host, graftds."""

    def __init__(self, opts):
        self.a = opts
        self.bench = None
        self.bin_dir = None
        self._bridge = None
        self.demo = None
        self.paths_by_name = {}

    def make_ns(self, tag):
        name = f"gb-{tag}{RUNID}"
        sh(["ip", "netns", "add", name])
        RUN.netns.append(name)
        sh(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def load_nat_ruleset(self, ns):
        """What Docker loads on every host (nat hooks + conntrack + stateful
        forward), with a published port that no benchmark uses."""
        rules = f"""table ip gbnat{RUNID} {{
  chain gb_prerouting {{
    type nat hook prerouting priority -100; policy accept;
    fib daddr type local jump gb_publish
  }}
  chain gb_output {{
    type nat hook output priority -100; policy accept;
    ip daddr != 127.0.0.0/8 fib daddr type local jump gb_publish
  }}
  chain gb_publish {{
    tcp dport 65000 dnat to 172.31.0.2:80
  }}
  chain gb_postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr 172.31.0.0/16 masquerade
  }}
  chain gb_forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
  }}
}}
"""
        sh(nsx(ns) + ["nft", "-f", "-"], input=rules)

    def bridge(self):
        if isinstance(self._bridge, BenchError):
            raise self._bridge
        if self._bridge is None:
            try:
                self._bridge = BridgeHost(self)
            except BenchError as e:
                self._bridge = BenchError(f"bridge host: {e}")
                raise
        return self._bridge

    def nginx_conf(self, name, bind, port):
        d = os.path.join(RUN.tmp, f"nginx-{name}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "index.html"), "w") as f:
            f.write("<html><body>" + "graft bench " * 48 + "</body></html>\n")  # ~600 bytes
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  # no path walk per request: in containers the root is fuse-overlayfs here,
  # and a lookup per request would measure the storage driver, not the network
  open_file_cache max=64 inactive=300s;
  open_file_cache_valid 300s;
  client_body_temp_path {d};
  proxy_temp_path {d};
  fastcgi_temp_path {d};
  uwsgi_temp_path {d};
  scgi_temp_path {d};
  server {{
    listen {bind}:{port};
    root {d};
    location / {{ }}
  }}
}}
""")
        return conf

    def graft_bin(self, name, bin_dir=None):
        """graft's binary `name`, from `bin_dir` (a path's own build, see
        --compare) or the run's."""
        p = os.path.join(bin_dir or self.bin_dir, name)
        if name == "graft" or name == "ip-graft" or name == "graftd":
            if not os.path.exists(p):
                raise BenchError(f"{p} is missing (cargo build --release --workspace)")
        return p

    def graftd(self, ns, tag, extra=(), bin_dir=None):
        return Graftd(self, ns, tag, extra, bin_dir)


def find_bins(a):
    """graft-bench (built when absent) and the directory with graftd, graft, ip-graft (None: not built)."""
    cands = [a.bin_dir] if a.bin_dir else [os.path.join(ROOT, "target/release"), os.path.join(ROOT, "target/debug")]
    bench = None
    for d in cands + [os.path.join(ROOT, "target/release"), os.path.join(ROOT, "target/debug")]:
        if d and os.path.exists(os.path.join(d, "graft-bench")):
            bench = os.path.join(d, "graft-bench")
            break
    if bench is None:
        say("bench: building graft-bench (cargo build --release -p graft-bench)")
        sh(["cargo", "build", "--release", "-p", "graft-bench"], timeout=900, section="build")
        bench = os.path.join(ROOT, "target/release/graft-bench")
    graft_dir = None
    for d in cands:
        if d and all(os.path.exists(os.path.join(d, b)) for b in ("graftd", "graft", "ip-graft")):
            graft_dir = d
            break
    return bench, graft_dir

