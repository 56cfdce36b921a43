"""The Docker rows (root namespace; only with a Docker engine and a
graft-demo image): docker-proxy, Docker's DNAT, --net=host and the AF_GRAFT
walkthrough, against the root namespace as it is."""

import os
import re
import shutil
import subprocess

from .load import descendants
from .paths import HostPath, Path, start_servers, wait_port
from .proc import RUN, RUNID, BenchError, sh, spawn


def demo_image():
    want = os.environ.get("GB_DEMO_IMAGE")
    p = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "graft-demo"],
                       capture_output=True, text=True, timeout=30)
    tags = p.stdout.split()
    if want:
        return want if want in tags or subprocess.run(["docker", "image", "inspect", want], capture_output=True,
                                                      timeout=30).returncode == 0 else None
    if "graft-demo:latest" in tags:
        return "graft-demo:latest"
    return tags[0] if tags else None


def docker_available():
    if not shutil.which("docker"):
        return None, "docker is not installed"
    try:
        p = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=30)
    except subprocess.TimeoutExpired:
        return None, "the Docker engine does not answer"
    if p.returncode != 0:
        return None, "the Docker engine does not answer"
    img = demo_image()
    if not img:
        return None, "no graft-demo image (docker/demo/build-image.sh builds it)"
    return img, ""


def docker_proxy_pids(port):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                c = f.read().split(b"\0")
        except OSError:
            continue
        if c and c[0].endswith(b"docker-proxy") and str(port).encode() in c:
            out.append(int(d))
    return out


def host_addr():
    """The first global IPv4 address of the default-route device."""
    p = subprocess.run(["ip", "-4", "-o", "route", "get", "1.1.1.1"], capture_output=True, text=True, timeout=10)
    m = re.search(r"\bsrc (\d+\.\d+\.\d+\.\d+)", p.stdout)
    return m.group(1) if m else None


class HostRootPath(HostPath):
    name = "host-root"
    label = "host root netns as it is (Docker's iptables-nft NAT rules loaded)"
    base = 21800

    def setup(self, h):
        self.procs = start_servers(h, self, [], "127.0.0.1", self.name)
        self.procs["churn"] = spawn([h.bench, "server", "--once", "--listen", f"127.0.0.1:{self.port('churn')}"],
                                    f"{self.name}-churn")
        for s in ("iperf", "pp", "nginx", "churn"):
            wait_port([], "127.0.0.1", self.port(s), self.label)

    def client(self):
        return []

    def egress_client(self):
        return []


class DockerPath(Path):
    """Servers in one graft-demo container (entrypoint replaced by sh)."""
    baseline = "host-root"
    run_args = []
    bind = "0.0.0.0"

    def container_cmd(self, h, conf):
        b = "/gb/graft-bench"
        return (f"iperf3 -s -p {self.port('iperf')} -B {self.bind} & "
                f"{b} server --listen {self.bind}:{self.port('pp')} & "
                f"exec nginx -c {conf}")

    def docker_run(self, h, name, args, cmd, entry="sh", entry_args=("-c",)):
        conf_dir = os.path.dirname(h.nginx_conf(self.name, self.bind, self.port("nginx")))
        argv = (["docker", "run", "-d", "--name", name, "-v", f"{h.bench}:/gb/graft-bench:ro",
                 "-v", f"{conf_dir}:{conf_dir}", "--entrypoint", entry] + args + [h.demo]
                + list(entry_args) + [cmd])
        RUN.containers.append(name)
        sh(argv, timeout=120)
        pid = sh(["docker", "inspect", "-f", "{{.State.Pid}}", name]).stdout.strip()
        return int(pid), os.path.join(conf_dir, "nginx.conf")

    def publish(self):
        return []

    def setup(self, h):
        name = f"gb-{self.name.replace('docker-', 'dk')}{RUNID}"
        conf_dir = os.path.dirname(h.nginx_conf(self.name, self.bind, self.port("nginx")))
        self.pid, _ = self.docker_run(h, name, self.run_args + self.publish(),
                                      self.container_cmd(h, os.path.join(conf_dir, "nginx.conf")))
        RUN.our_roots.add(self.pid)
        for s in ("iperf", "pp", "nginx"):
            addr, port = self.target(s)
            try:
                wait_port([], addr, port, self.label)
            except BenchError as e:
                logs = sh(["docker", "logs", name], check=False).stderr[-1500:]
                raise BenchError(f"{e}\ncontainer log:\n{logs}")
        for pid in docker_proxy_pids(self.port("pp")):
            RUN.our_roots.add(pid)

    def pp_pids(self):
        return descendants(self.pid) + docker_proxy_pids(self.port("pp"))


class DockerProxyPath(DockerPath):
    name = "docker-proxy"
    label = "docker run -p 127.0.0.1:P:P (docker-proxy)"
    base = 21900

    def publish(self):
        a = []
        for s in ("iperf", "pp", "nginx"):
            a += ["-p", f"127.0.0.1:{self.port(s)}:{self.port(s)}"]
        return a + ["-p", f"127.0.0.1:{self.port('iperf')}:{self.port('iperf')}/udp"]


class DockerDnatPath(DockerPath):
    name = "docker-dnat"
    label = "docker run -p HOSTADDR:P:P, client dials the host address (iptables DNAT)"
    base = 22000

    def publish(self):
        self.addr = host_addr()
        if not self.addr:
            raise BenchError("no global IPv4 address on this host")
        a = []
        for s in ("iperf", "pp", "nginx"):
            a += ["-p", f"{self.addr}:{self.port(s)}:{self.port(s)}"]
        return a + ["-p", f"{self.addr}:{self.port('iperf')}:{self.port('iperf')}/udp"]

    def target(self, svc):
        return self.addr, self.port(svc)


class DockerHostPath(DockerPath):
    name = "docker-host"
    label = "docker run --net=host"
    base = 22100
    run_args = ["--net=host"]
    bind = "127.0.0.1"


class GraftDockerPath(DockerPath):
    """The AF_GRAFT walkthrough: net1 holds the namespace (--net=none), a
    private graftd in the root namespace, endpoints defined inside net1, the
    servers in graft-demo on --net=container:net1 under `graft`."""
    name = "graft-docker"
    label = "graft-demo on --net=container:net1 (graftd in the root netns)"
    base = 22200
    workloads = Path.workloads + ("churn", "churn_pin")

    def setup(self, h):
        net1 = f"gb-net1-{RUNID}"
        RUN.containers.append(net1)
        sh(["docker", "run", "-d", "--net=none", "--name", net1, "--entrypoint", "sleep", h.demo, "infinity"],
           timeout=120)
        self.net1_pid = int(sh(["docker", "inspect", "-f", "{{.State.Pid}}", net1]).stdout.strip())
        self.d = h.graftd(None, self.name)
        inside = ["nsenter", f"--net=/proc/{self.net1_pid}/ns/net"]
        self.eps = {"iperf": "ep-ip", "pp": "ep-pp", "nginx": "ep-ng"}
        for s, ep in self.eps.items():
            self.d.add(inside, f"{ep} type ipv4 addr 127.0.0.1 port {self.port(s)}")
        spare = self.base + 8
        self.d.add(inside, f"ep-in4 type ipv4 addr 127.0.0.1 port {spare}")
        self.d.add(inside, f"ep-in6 type ipv6 addr ::1 port {spare}")
        self.d.add(inside, "ep-out4 type ipv4 addr 0.0.0.0 port dynamic")
        self.d.add(inside, "ep-out6 type ipv6 addr :: port dynamic")
        self.net = f"--net=container:{net1}"
        rules = []
        for s, ep in self.eps.items():
            rules += ["-i", f"0.0.0.0:{self.port(s)}={ep}"]
        conf_dir = os.path.dirname(h.nginx_conf(self.name, "0.0.0.0", self.port("nginx")))
        name = f"gb-dkg{RUNID}"
        self.pid, _ = self.docker_run(h, name, [self.net, "-e", f"GRAFT_BROKER={self.d.broker}"],
                                      self.container_cmd(h, os.path.join(conf_dir, "nginx.conf")),
                                      entry="graft", entry_args=tuple(rules) + ("--", "sh", "-c"))
        RUN.our_roots.add(self.pid)
        self.procs = {"churn": spawn([h.bench, "server", "--once", "--listen", f"127.0.0.1:{self.port('churn')}"],
                                     f"{self.name}-churn")}
        for s in ("iperf", "pp", "nginx", "churn"):
            try:
                wait_port([], "127.0.0.1", self.port(s), self.label)
            except BenchError as e:
                logs = sh(["docker", "logs", name], check=False)
                raise BenchError(f"{e}\ncontainer log:\n{(logs.stdout + logs.stderr)[-1500:]}\n"
                                 f"graftd log:\n{self.d.log_text()}")

    def egress_argv(self, h, tool_args, pinned=False):
        # the image's own entrypoint: every connection goes out through ep-out4
        pin = ["--cpuset-cpus", "0"] if pinned else []
        return (["docker", "run", "--rm", self.net] + pin + ["-e", f"GRAFT_BROKER={self.d.broker}",
                 "-v", f"{h.bench}:/gb/graft-bench:ro", h.demo, "/gb/graft-bench"] + tool_args)


DOCKER_PATHS = [HostRootPath, DockerProxyPath, DockerDnatPath, DockerHostPath, GraftDockerPath]

