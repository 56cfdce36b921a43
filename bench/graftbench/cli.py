"""bench/run's command line: options, checks, and one run from path setup to
the result file."""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from .docker import DOCKER_PATHS, GraftDockerPath, docker_available
from .harness import Harness, find_bins
from .paths import ALL_PATHS, GraftComparePath, GraftG2GComparePath, GraftPath, GraftSeccompCgroupPath, cgroup2_mount
from .proc import RUN, BenchError, cleanup, on_signal, record, say
from .report import HALT_POLL_NS, fmt, idle_info, replot, write_results
from .workloads import config, micro, run_cell

DOCKER_DAEMONS = {"dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2",
                  "docker-proxy", "runc", "docker-init", "docker"}
TOOLS = ("ip", "nft", "iperf3", "wrk", "nginx", "taskset")


@dataclass(frozen=True)
class Options:
    """The command line, checked."""
    mode: str                      # full, quick, smoke or replot
    label: Optional[str] = None
    runs: Optional[int] = None
    secs: Optional[int] = None
    paths: Optional[str] = None
    workloads: Optional[str] = None
    no_docker: bool = False
    bin_dir: Optional[str] = None
    compare: Optional[str] = None
    out: Optional[str] = None
    keep: bool = False
    replot: Optional[str] = None
    halt_poll_ns: Optional[int] = None


@dataclass
class Outcome:
    """What one run measured and what went wrong, for the result file."""
    started: str
    paths: list = field(default_factory=list)
    results: dict = field(default_factory=dict)   # (path, metric) -> [samples]
    notes: dict = field(default_factory=dict)     # (path, metric) -> contaminated samples
    failures: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    idle: str = "?"                               # the vCPUs' idle policy during the run
    rc: int = 0

    def fail(self, what):
        self.failures.append(what)
        self.rc = 1


class Parser(argparse.ArgumentParser):
    """Bad input: exit 2 with one line, not argparse's usage block."""

    def error(self, message):
        say(f"{self.prog}: {message} (--help lists the options)")
        sys.exit(2)


def parse(argv, doc):
    ap = Parser(prog="bench/run", description=doc.split("\n\n")[0], allow_abbrev=False)
    # not required=True: argparse would report a missing mode before an unknown option
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true")
    g.add_argument("--quick", action="store_true")
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--replot", metavar="RESULT.json", help="redraw RESULT.png from saved samples (alone)")
    ap.add_argument("--label")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--secs", type=int)
    ap.add_argument("--paths")
    ap.add_argument("--workloads")
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--bin-dir")
    ap.add_argument("--compare", metavar="BIN_DIR",
                    help="also run graft's rows with another build's graftd/graft/ip-graft (paths graft-cmp, graft-g2g-cmp)")
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--halt-poll-ns", type=int, metavar="NS",
                    help="for this run, let an idle vCPU poll NS ns before it halts (cpuidle-haltpoll's "
                         "guest_halt_poll_ns; restored at the end): cross-CPU wake-ups then cost what they "
                         "cost on bare metal instead of a VM exit each")
    a = ap.parse_args(argv)
    if not (a.full or a.quick or a.smoke or a.replot):
        ap.error("one of --full, --quick, --smoke, --replot RESULT.json is required")
    if a.replot is not None and len(argv) != 2:
        ap.error("--replot takes only the JSON file")
    if a.runs is not None and not (1 <= a.runs <= 20):
        ap.error("--runs must be 1..20")
    if a.secs is not None and not (1 <= a.secs <= 120):
        ap.error("--secs must be 1..120 (whole seconds: wrk and iperf3 take integers)")
    if a.paths:
        known = {c.name for c in ALL_PATHS + DOCKER_PATHS}
        bad = set(a.paths.split(",")) - known
        if bad:
            ap.error(f"unknown path(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
    if a.compare is not None:
        missing = [b for b in ("graftd", "graft", "ip-graft") if not os.path.isfile(os.path.join(a.compare, b))]
        if missing:
            ap.error(f"--compare {a.compare}: no {', '.join(missing)} there")
    else:
        for cmp in ("graft-cmp", "graft-g2g-cmp"):
            if a.paths and cmp in a.paths.split(","):
                ap.error(f"path {cmp} needs --compare BIN_DIR")
    if a.halt_poll_ns is not None:
        if not (0 <= a.halt_poll_ns <= 10_000_000):
            ap.error("--halt-poll-ns must be 0..10000000")
        if not os.path.exists(HALT_POLL_NS):
            ap.error(f"--halt-poll-ns: no {HALT_POLL_NS} (the cpuidle-haltpoll driver of a KVM guest)")
    mode = next(m for m in ("full", "quick", "smoke", "replot") if getattr(a, m))
    return Options(mode=mode, label=a.label, runs=a.runs, secs=a.secs, paths=a.paths, workloads=a.workloads,
                   no_docker=a.no_docker, bin_dir=a.bin_dir, compare=a.compare, out=a.out, keep=a.keep,
                   replot=a.replot, halt_poll_ns=a.halt_poll_ns)


def set_halt_poll(ns):
    """Sets guest_halt_poll_ns for the run; the old value goes back at
    teardown (also on error or signal)."""
    with open(HALT_POLL_NS) as f:
        old = f.read().strip()

    def restore():
        with open(HALT_POLL_NS, "w") as f:
            f.write(old)

    with open(HALT_POLL_NS, "w") as f:
        f.write(str(ns))
    RUN.cleanups.append(restore)


def choose_paths(h, opts, out):
    """The path classes to run: Docker rows when an engine and image are
    there, --paths with every baseline they need, graft rows when built."""
    classes = list(ALL_PATHS)
    for cmp in (GraftComparePath, GraftG2GComparePath):
        if opts.compare:
            cmp.bin_dir = os.path.abspath(opts.compare)
            cmp.label = f"{cmp.label.split(' with ')[0]} with the binaries of {cmp.bin_dir} (--compare)"
        else:
            classes.remove(cmp)
    if opts.no_docker:
        out.skipped.append("docker rows: --no-docker")
    else:
        h.demo, why = docker_available()
        if h.demo:
            classes += DOCKER_PATHS
            RUN.exempt |= DOCKER_DAEMONS
            say(f"bench: docker rows with image {h.demo}")
        else:
            out.skipped.append(f"docker rows: {why}")
            say(f"SKIP: docker rows: {why}")
    if opts.paths:
        want = set(opts.paths.split(","))
        # every path needs its baseline (and graft+nat its host side)
        for c in classes:
            if c.name in want:
                want.add(getattr(c, "host_path", "host"))
                want.add(c.baseline)
        want.add("host")
        classes = [c for c in classes if c.name in want]
    if cgroup2_mount() is None and GraftSeccompCgroupPath in classes:
        classes.remove(GraftSeccompCgroupPath)
        out.skipped.append("graft-seccomp-cg: no cgroup2 mount")
        say("SKIP: graft-seccomp-cg: no cgroup2 mount")
    if not h.bin_dir:
        classes = [c for c in classes if not issubclass(c, (GraftPath, GraftDockerPath))]
        out.skipped.append("graft rows: graftd/graft/ip-graft not built (cargo build --release --workspace)")
        say("SKIP: graft rows: graftd/graft/ip-graft are not built")
    return classes


def set_up(h, classes, out):
    for cls in classes:
        p = cls()
        say(f"bench: setting up {p.name}: {p.label}")
        try:
            p.setup(h)
            out.paths.append(p)
            h.paths_by_name[p.name] = p
        except BenchError as e:
            out.fail(f"{p.name}: setup failed: {e}")
            say(f"FAIL: {p.name}: setup: {e}")


def measure(h, cfg, out):
    """Every cell, runs interleaved: run 1 of every path, then run 2, …, the
    paths' order rotated by one each run. The cell run second of a pair
    measured ~5 % lower in paired runs on the 2-CPU VM whichever build it
    was (bench/results/2026-12-02-s20-ka-check.md and …-ka-swapped.md, and
    2026-12-02-s21-compare*.md): in a fixed order, the host row (first)
    gained and the last path lost. Over a multiple of the path count of
    runs, every path runs in every position equally often."""
    total = cfg.runs * len(cfg.workloads) * len(out.paths)
    done = 0
    for r in range(cfg.runs):
        k = r % max(1, len(out.paths))
        order = out.paths[k:] + out.paths[:k]
        for wl in cfg.workloads:
            for p in order:
                if wl not in p.workloads:
                    continue
                done += 1
                try:
                    vals, flag, frac = run_cell(h, p, wl, cfg, out.results, out.notes)
                    shown = ", ".join(f"{k}={fmt(v)}" for k, v in vals.items())
                    say(f"  [{done}/{total}] run {r + 1} {wl:8s} {p.name:12s} {shown}"
                        + (f"  (other load {frac * 100:.0f}%{' *' if flag else ''})" if frac > 0.02 else ""))
                except BenchError as e:
                    out.fail(f"{p.name}/{wl} run {r + 1}: {e}")
                    record("failure", f"{p.name}/{wl} run {r + 1}: {e}")
                    say(f"FAIL: {p.name}/{wl}: {e}")


def start(opts):
    """The run's work dir, command log, teardown and binaries."""
    RUN.tmp = tempfile.mkdtemp(prefix="gb-bench-")
    os.chmod(RUN.tmp, 0o755)  # nginx workers (user nobody) read files below it
    RUN.log = open(os.path.join(RUN.tmp, "commands.log"), "w")
    RUN.our_roots = {os.getpid()}
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    h = Harness(opts)
    h.bench, h.bin_dir = find_bins(opts)
    return h


def smoke_verdict(cfg, out):
    for p in out.paths:
        for wl in cfg.workloads:
            if wl in p.workloads and not out.results.get((p.name, wl)):
                out.rc = 1
    say("smoke: " + ("OK, every path carried traffic" if out.rc == 0 else "FAILED (see FAIL lines above)"))
    return out.rc


def main(argv, doc):
    opts = parse(argv, doc)
    if opts.replot:
        if not os.path.isfile(opts.replot):
            say(f"bench/run: --replot: no file {opts.replot}")
            return 2
        return replot(opts.replot)
    if os.geteuid() != 0:
        say("bench/run: needs root (network namespaces, nft, graftd)")
        return 2
    for prog in TOOLS:
        if not shutil.which(prog):
            say(f"bench/run: `{prog}` is not installed (make deps installs it)")
            return 2
    try:
        cfg = config(opts.mode, runs=opts.runs, secs=opts.secs, workloads=opts.workloads)
    except ValueError as e:
        say(f"bench/run: {e}")
        return 2

    h = start(opts)
    out = Outcome(started=datetime.datetime.utcnow().strftime("%H:%M:%S"))
    if opts.halt_poll_ns is not None:
        try:
            set_halt_poll(opts.halt_poll_ns)
        except OSError as e:
            say(f"bench/run: --halt-poll-ns: {HALT_POLL_NS}: {e.strerror}")
            return 2
    out.idle = idle_info()
    say(f"bench: mode {opts.mode}, work dir {RUN.tmp}, graft-bench {h.bench}, "
        f"graft binaries {h.bin_dir or 'ABSENT'}")
    classes = choose_paths(h, opts, out)
    try:
        set_up(h, classes, out)
        measure(h, cfg, out)
        gp = h.paths_by_name.get("graft")
        if cfg.micro and gp is not None and not opts.workloads:
            try:
                micro(h, cfg, gp, out.results, out.notes)
            except BenchError as e:
                out.failures.append(f"micro: {e}")
                say(f"FAIL: micro: {e}")
    except KeyboardInterrupt as e:
        say(f"bench: interrupted ({e}); cleaning up")
        out.rc = 130
    finally:
        if opts.keep and out.rc == 0:
            say(f"bench: --keep: leaving {RUN.netns}")
            RUN.netns = []
        cleanup()
    if opts.mode == "smoke":
        return smoke_verdict(cfg, out)
    if out.paths:
        f = write_results(h, cfg, out)
        say(f"bench: wrote {f}")
    return out.rc
