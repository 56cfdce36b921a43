"""The workloads (iperf3, ping-pong, nginx+wrk, churn, the micro loops) and
how one cell is measured: load check before, other processes' CPU during,
re-run when contaminated."""

import json
import re
import time
from dataclasses import dataclass, replace

from .load import descendants, others_cpu, proc_table, wait_quiet
from .proc import NCPU, RUN, BenchError, kv, nsx, on_cpu0, run_client, say, sh

WORKLOADS = {
    # name: (unit, higher_is_better, label)
    "tcp1": ("Gbit/s", True, "iperf3 TCP 1 flow"),
    "tcp4": ("Gbit/s", True, "iperf3 TCP -P4"),
    "udp": ("Gbit/s", True, "iperf3 UDP (received)"),
    "lat_pin": ("µs p50", False, "ping-pong 64 B p50, pinned cpu0"),
    "lat_pin99": ("µs p99", False, "ping-pong 64 B p99, pinned cpu0"),
    "lat": ("µs p50", False, "ping-pong 64 B p50, unpinned"),
    "lat99": ("µs p99", False, "ping-pong 64 B p99, unpinned"),
    "ka": ("req/s", True, "nginx+wrk keep-alive"),
    "close": ("req/s", True, "nginx+wrk Connection: close"),
    "churn": ("conn/s", True, "egress churn (new conn per request)"),
    "churn_pin": ("conn/s", True, "egress churn, pinned cpu0"),
    "wrk_out": ("req/s", True, "wrk -c32 Connection: close as the egress client (wrk cpu0, nginx cpu1)"),
}
# metrics derived from another cell's output (same run), not run on their own
DERIVED = {"lat_pin99": "lat_pin", "lat99": "lat"}


def w_iperf(h, path, wl, cfg):
    addr, port = path.target("iperf")
    argv = path.client() + ["timeout", str(int(cfg.secs) + 20), "iperf3", "-c", addr, "-p", str(port),
                            "-t", str(cfg.secs), "-J", "--connect-timeout", "3000"]
    if wl == "tcp4":
        argv += ["-P", "4"]
    if wl == "udp":
        argv += ["-u", "-b", "0", "-l", "1400"]
    out = run_client(argv, cfg.secs + 30, f"{path.name}/{wl}")
    try:
        d = json.loads(out)
    except ValueError as e:
        raise BenchError(f"iperf3 printed no JSON: {out[-500:]}") from e
    if "error" in d:
        raise BenchError(f"iperf3: {d['error']}")
    r = d["end"]["sum_received"]["bits_per_second"] / 1e9
    if r <= 0:
        raise BenchError("iperf3 moved no data")
    return {wl: r}


def w_latency(h, path, wl, cfg):
    addr, port = path.target("pp")
    cli = [h.bench, "latency", "--connect", f"{addr}:{port}", "--count", str(cfg.lat_count),
           "--secs", str(cfg.lat_secs), "--warmup", "300"]
    pinned = wl == "lat_pin"
    if pinned:
        cli = ["taskset", "-c", "0"] + cli
    with on_cpu0(path.pp_pids() if pinned else []):
        out = run_client(path.client() + cli, cfg.lat_secs + 20, f"{path.name}/{wl}")
    v = kv(out)
    if not v.get("n"):
        raise BenchError(f"latency client measured nothing: {out}")
    p99 = "lat_pin99" if pinned else "lat99"
    return {wl: v["p50_us"], p99: v["p99_us"]}


def w_wrk(h, path, wl, cfg):
    addr, port = path.target("nginx")
    argv = path.client() + ["timeout", str(int(cfg.secs) + 20), "wrk", "-t1", "-c32", f"-d{cfg.secs}s"]
    if wl == "close":
        argv += ["-H", "Connection: close"]
    argv += [f"http://{addr}:{port}/"]
    out = run_client(argv, cfg.secs + 30, f"{path.name}/{wl}")
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if not m:
        raise BenchError(f"wrk printed no rate:\n{out}")
    errs = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise BenchError(f"wrk: {non2xx.group(0)}")
    if errs:
        n = sum(int(x) for x in re.findall(r"\d+", errs.group(1)))
        total = re.search(r"(\d+) requests in", out)
        if total and n > 0.01 * int(total.group(1)):
            raise BenchError(f"wrk: {errs.group(0)}")
    return {wl: float(m.group(1))}


def w_churn(h, path, wl, cfg):
    addr, port = path.target("churn")
    pinned = wl == "churn_pin"
    argv = path.egress_argv(h, ["churn", "--connect", f"{addr}:{port}", "--count", str(cfg.churn_count),
                                "--secs", str(cfg.lat_secs)], pinned=pinned)
    pids = []
    if pinned:
        # client, server and (for graft) graftd all on cpu0: the broker round
        # trip without cross-CPU wake-ups
        pids = [path.procs["churn"].pid] + ([path.d.p.pid] if getattr(path, "d", None) else [])
        argv = ["taskset", "-c", "0"] + argv
    with on_cpu0(pids):
        out = run_client(argv, cfg.lat_secs + 20, f"{path.name}/{wl}")
    v = kv(out)
    if not v.get("n"):
        raise BenchError(f"churn client measured nothing: {out}")
    return {wl: v["conn_per_s"]}


def w_wrk_out(h, path, wl, cfg):
    """wrk (unmodified, dynamically linked: grafted by the preload library)
    as the egress client, a new connection per request against a plain host
    nginx; wrk on cpu0, nginx (master and worker) on the last CPU, as in
    issue 10."""
    target = path.egress_nginx()
    if target is None:
        raise BenchError(f"{path.name}: no egress nginx")
    addr, port, ng = target
    pids = descendants(ng.pid)
    argv = path.egress_client() + ["taskset", "-c", "0", "timeout", str(int(cfg.secs) + 20), "wrk", "-t1", "-c32",
                                   f"-d{cfg.secs}s", "-H", "Connection: close", f"http://{addr}:{port}/"]
    try:
        for pid in pids:
            sh(["taskset", "-a", "-p", "-c", str(NCPU - 1), str(pid)], quiet=True)
        out = run_client(argv, cfg.secs + 30, f"{path.name}/{wl}")
    finally:
        for pid in pids:
            sh(["taskset", "-a", "-p", "-c", f"0-{NCPU - 1}", str(pid)], quiet=True, check=False)
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if not m:
        raise BenchError(f"wrk printed no rate:\n{out}")
    errs = re.search(r"Socket errors: (.*)", out)
    if errs:
        n = sum(int(x) for x in re.findall(r"\d+", errs.group(1)))
        total = re.search(r"(\d+) requests in", out)
        if total and n > 0.01 * int(total.group(1)):
            raise BenchError(f"wrk: {errs.group(0)}")
    return {wl: float(m.group(1))}


RUNNERS = {"tcp1": w_iperf, "tcp4": w_iperf, "udp": w_iperf, "lat_pin": w_latency, "lat": w_latency,
           "ka": w_wrk, "close": w_wrk, "churn": w_churn, "churn_pin": w_churn, "wrk_out": w_wrk_out}


@dataclass(frozen=True)
class Config:
    """How much to measure: one per mode, then --runs/--secs/--workloads."""
    mode: str
    runs: int            # interleaved runs of every cell
    secs: int            # length of an iperf3/wrk cell
    lat_count: int       # ping-pong round trips per latency cell (at most)
    lat_secs: float      # time limit of a latency/churn cell
    churn_count: int     # connections per churn cell (at most)
    workloads: tuple
    quiet_wait: float    # how long to wait for an idle machine before a cell (0: not at all)
    retries: int         # re-runs of a contaminated cell
    micro: bool          # run the preload/broker cost loops


MODES = {
    "full": Config("full", runs=3, secs=5, lat_count=20000, lat_secs=3, churn_count=3000,
                   workloads=("tcp1", "tcp4", "udp", "lat_pin", "lat", "ka", "close", "churn", "churn_pin",
                              "wrk_out"),
                   quiet_wait=10, retries=2, micro=True),
    # pinned churn: unpinned churn mostly measures whether the other vCPU
    # happens to be awake (idle vCPUs halt; a cross-CPU wake-up costs ~0.4 ms)
    "quick": Config("quick", runs=1, secs=1, lat_count=5000, lat_secs=1.0, churn_count=1000,
                    workloads=("tcp1", "lat_pin", "ka", "close", "churn_pin"),
                    quiet_wait=3, retries=0, micro=True),
    "smoke": Config("smoke", runs=1, secs=1, lat_count=200, lat_secs=1.0, churn_count=50,
                    workloads=("lat_pin", "churn"), quiet_wait=0, retries=0, micro=False),
}


def config(mode, runs=None, secs=None, workloads=None):
    """The mode's Config with the command line's overrides; ValueError names a bad workload."""
    c = MODES[mode]
    if runs:
        c = replace(c, runs=runs)
    if secs:
        c = replace(c, secs=secs)
    if workloads:
        wls = tuple(workloads.split(","))
        for w in wls:
            if w not in RUNNERS:
                raise ValueError(f"unknown workload `{w}` (known: {', '.join(RUNNERS)})")
        c = replace(c, workloads=wls)
    return c


def run_cell(h, path, wl, cfg, results, notes):
    """One measurement with a load check; re-run when contaminated."""
    attempts = 1 + cfg.retries
    last = None
    for attempt in range(attempts):
        busy = wait_quiet(cfg.quiet_wait) if cfg.quiet_wait else 0.0
        before = proc_table()
        t0 = time.time()
        vals = RUNNERS[wl](h, path, wl, cfg)
        wall = time.time() - t0
        other, who = others_cpu(before, proc_table(), RUN.our_roots)
        frac = other / max(wall, 1e-3)
        contaminated = frac > 0.10 and cfg.mode != "smoke"
        last = (vals, busy, frac, who)
        if not contaminated:
            break
        top = ", ".join(f"{k}" for k, _ in sorted(who.items(), key=lambda x: -x[1])[:3])
        say(f"    contaminated: other processes used {frac*100:.0f}% of a CPU ({top}); "
            + ("re-running" if attempt + 1 < attempts else "keeping it, marked"))
    vals, busy, frac, who = last
    flag = frac > 0.10 and cfg.mode != "smoke"
    for k, v in vals.items():
        results.setdefault((path.name, k), []).append(v)
        if flag:
            notes.setdefault((path.name, k), 0)
            notes[(path.name, k)] += 1
    return vals, flag, frac


def micro(h, cfg, gp, results, notes):
    """Interleaved: the same loop with and without the preload library."""
    hns = gp.hns
    dest = f"127.0.0.1:{gp.base + 9}"  # nobody listens: identical kernel work both ways
    graft = gp.egress_client()
    n = 1000000 if cfg.mode == "full" else 200000
    ns_n = 2000 if cfg.mode == "full" else 500
    reps = max(cfg.runs, 3) if cfg.mode == "full" else 1
    rows = {
        "send_plain": nsx(hns) + [h.bench, "sendcost", "--dest", dest, "--count", str(n)],
        "send_graft": graft + [h.bench, "sendcost", "--dest", dest, "--count", str(n)],
        "oob_plain": nsx(hns) + [h.bench, "sendcost", "--dest", dest, "--count", str(n), "--oob"],
        "oob_graft": graft + [h.bench, "sendcost", "--dest", dest, "--count", str(n), "--oob"],
        "sock_plain": nsx(hns) + [h.bench, "sockcost", "--dest", dest, "--count", str(ns_n)],
        "sock_graft": graft + [h.bench, "sockcost", "--dest", dest, "--count", str(ns_n)],
        "sock_plain_pin": nsx(hns) + ["taskset", "-c", "0", h.bench, "sockcost", "--dest", dest, "--count", str(ns_n)],
    }
    # pinned grafted: graftd on the same CPU as the client
    rows["sock_graft_pin"] = graft + ["taskset", "-c", "0", h.bench, "sockcost", "--dest", dest, "--count", str(ns_n)]
    # the same loops on the seccomp path (every sendto with an address is a
    # notification there, so the send loop is shorter)
    sc = graft[:-1] + ["--mode", "seccomp", "--"]
    rows["send_seccomp"] = sc + [h.bench, "sendcost", "--dest", dest, "--count", str(n // 100)]
    rows["sock_seccomp"] = sc + [h.bench, "sockcost", "--dest", dest, "--count", str(ns_n)]
    rows["sock_seccomp_pin"] = sc + ["taskset", "-c", "0", h.bench, "sockcost", "--dest", dest, "--count", str(ns_n)]
    for r in range(reps):
        for k, argv in rows.items():
            with on_cpu0([gp.d.p.pid] if k.endswith("_pin") else []):
                if cfg.quiet_wait:
                    wait_quiet(cfg.quiet_wait)
                out = run_client(argv, 120, f"micro/{k}")
            v = kv(out)
            val = v["ns_per_call"] if "ns_per_call" in v else v["p50_us"]
            results.setdefault(("micro", k), []).append(val)
            if k.startswith("sock"):
                results.setdefault(("micro", k + "_mean"), []).append(v["mean_us"])
            say(f"  micro {k}: {val:.2f} {'ns/call' if 'ns_per_call' in v else 'µs p50'}")
