"""Commands, long-running processes and their teardown.

Every command the harness runs goes through `sh`, `spawn` or `run_client`, so
it lands in the command log and the result file, and everything started or
created is recorded in `RUN` and torn down by `cleanup` on exit, failure or
signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNID = os.getpid() % 10000
NCPU = os.cpu_count() or 1


@dataclass
class RunState:
    """What this run made, so that cleanup can find it."""
    tmp: Optional[str] = None                    # temp dir of this run
    log: Optional[IO[str]] = None                # command log
    procs: list = field(default_factory=list)    # Popen objects of long-running servers
    netns: list = field(default_factory=list)    # namespaces we created, deleted in reverse order
    containers: list = field(default_factory=list)  # docker containers we created
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # extra teardown (LIFO)
    our_roots: set = field(default_factory=set)  # pids whose descendants count as "ours" in load checks
    cmds: list = field(default_factory=list)     # (section, command string) for the result file
    exempt: set = field(default_factory=set)     # shared daemons doing our work (Docker rows): not "other load"


RUN = RunState()


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def q(a):
    a = str(a)
    if re.fullmatch(r"[A-Za-z0-9_./:=,+@%-]+", a):
        return a
    return "'" + a.replace("'", "'\\''") + "'"


def cmdstr(argv):
    return " ".join(q(a) for a in argv)


def record(section, argv):
    s = cmdstr(argv) if isinstance(argv, (list, tuple)) else argv
    RUN.cmds.append((section, s))
    if RUN.log:
        RUN.log.write(f"[{time.strftime('%H:%M:%S')}] {section}: {s}\n")
        RUN.log.flush()


def sh(argv, check=True, timeout=60, section="setup", quiet=False, env=None, input=None):
    """Runs a command to completion (bounded by timeout)."""
    if not quiet:
        record(section, argv)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=env, input=input)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout}s: {cmdstr(argv)}") from e
    if check and p.returncode != 0:
        raise BenchError(f"failed ({p.returncode}): {cmdstr(argv)}\n{p.stderr.strip()[-2000:]}")
    return p


def spawn(argv, name, env=None, section="setup"):
    """Starts a long-running server; its output goes to a log file."""
    record(section, argv + ["&"])
    logf = open(os.path.join(RUN.tmp, f"{name}.log"), "w")
    p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env, start_new_session=True)
    p.gb_name = name
    p.gb_log = logf.name
    RUN.procs.append(p)
    return p


def proc_log(p):
    try:
        with open(p.gb_log) as f:
            return f.read()[-3000:]
    except OSError:
        return ""


def kill_proc(p):
    """SIGTERM to the process group, SIGKILL after 3 s; gives up 3 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=3)
            return
        except subprocess.TimeoutExpired:
            pass


class BenchError(Exception):
    pass


def cleanup():
    """Tears down everything we made; safe to call twice."""
    while RUN.cleanups:
        f = RUN.cleanups.pop()
        try:
            f()
        except Exception as e:  # keep tearing down the rest
            say(f"cleanup: {e}")
    for p in reversed(RUN.procs):
        kill_proc(p)
    RUN.procs = []
    for c in reversed(RUN.containers):
        subprocess.run(["docker", "rm", "-f", c], capture_output=True, timeout=30)
    RUN.containers = []
    for ns in reversed(RUN.netns):
        netns_kill_all(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    RUN.netns = []


def netns_kill_all(ns):
    """Kills every process inside a namespace we created (they are all ours)."""
    for _ in range(3):
        p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
        pids = [int(x) for x in p.stdout.split() if x.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def on_signal(sig, _frame):
    raise KeyboardInterrupt(f"signal {sig}")


def nsx(ns):
    return ["ip", "netns", "exec", ns]


def run_client(argv, timeout, section):
    """Runs one measuring client; its stdout, or BenchError naming the command."""
    record(section, argv)
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout}s: {cmdstr(argv)}") from e
    if p.returncode != 0:
        raise BenchError(f"client failed ({p.returncode}): {cmdstr(argv)}\n{(p.stderr or p.stdout).strip()[-1500:]}")
    return p.stdout


def kv(line):
    """`a=1 b=2.5` (graft-bench's output) as a dict of floats."""
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", line)}


@contextmanager
def on_cpu0(pids):
    """Pins running processes (all their threads) to CPU 0 for the block."""
    try:
        for pid in pids:
            sh(["taskset", "-a", "-p", "-c", "0", str(pid)], quiet=True)
        yield
    finally:
        for pid in pids:
            sh(["taskset", "-a", "-p", "-c", f"0-{NCPU - 1}", str(pid)], quiet=True, check=False)
