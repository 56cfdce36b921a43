"""Machine load: wait until idle before a cell, and measure how much CPU
processes that are not ours used during it."""

import os
import time

from .proc import RUN


def cpu_busy_sample(secs):
    """Fraction of all CPUs busy during `secs` (from /proc/stat)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v[:8]), idle
    t0, i0 = read()
    time.sleep(secs)
    t1, i1 = read()
    dt = max(t1 - t0, 1)
    return 1.0 - (i1 - i0) / dt


def proc_table():
    """pid -> (ppid, cpu ticks) for every process; kernel threads skipped."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rp = s.rfind(")")
        f = s[rp + 2:].split()
        ppid = int(f[1])
        flags = int(f[6])
        if flags & 0x00200000 or int(d) == 2 or ppid == 2:  # PF_KTHREAD
            continue
        out[int(d)] = (ppid, int(f[11]) + int(f[12]))
    return out


def is_ours(pid, table, roots):
    seen = 0
    while pid > 1 and seen < 64:
        if pid in roots:
            return True
        e = table.get(pid)
        if not e:
            return False
        pid = e[0]
        seen += 1
    return False


def others_cpu(before, after, roots):
    """CPU seconds used between two proc tables by processes that are not ours."""
    hz = os.sysconf("SC_CLK_TCK")
    tot = 0
    who = {}
    for pid, (ppid, t1) in after.items():
        t0 = before.get(pid, (ppid, 0))[1] if pid in before else 0
        d = t1 - t0
        if d <= 0 or is_ours(pid, after, roots):
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() in RUN.exempt:
                    continue
        except OSError:
            pass
        tot += d
        try:
            with open(f"/proc/{pid}/comm") as f:
                c = f.read().strip()
            who[c] = who.get(c, 0) + d
        except OSError:
            pass
    return tot / hz, who


def wait_quiet(limit, threshold=0.15, sample=0.3):
    """Waits (bounded) until the machine is mostly idle; returns busy fraction."""
    start = time.time()
    busy = cpu_busy_sample(sample)
    while busy > threshold and time.time() - start < limit:
        time.sleep(1.0)
        busy = cpu_busy_sample(sample)
    return busy


def descendants(pid):
    """pid and all its descendants (from /proc)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                ppid = int(st[st.rfind(")") + 2:].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo and len(out) < 10000:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out
