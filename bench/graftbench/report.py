"""The result files: markdown table of medians [min–max], ratios to host,
preload/broker cost, an automatic reading, every command; the raw samples as
JSON; the ratio chart (gnuplot)."""

import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from .docker import DOCKER_PATHS
from .paths import ALL_PATHS
from .proc import NCPU, ROOT, RUN, say
from .workloads import WORKLOADS


def fmt(v):
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(path_v, host_v, hib):
    if not path_v or not host_v:
        return None
    return path_v / host_v if hib else host_v / path_v


HALT_POLL_NS = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def idle_info():
    """How an idle vCPU waits: the cpuidle driver and, with cpuidle-haltpoll,
    how long it polls before it halts. A halted vCPU's wake-up is a VM exit:
    on these machines that sets the unpinned latency and churn cells."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    driver = read("/sys/devices/system/cpu/cpuidle/current_driver") or "none"
    poll = read(HALT_POLL_NS)
    if poll is None:
        return f"cpuidle {driver}"
    note = " (an idle vCPU halts at once)" if poll == "0" else ""
    return f"cpuidle {driver}, guest_halt_poll_ns={poll}{note}"


def machine_info():
    kern = os.uname().release
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except OSError:
        pass
    vers = {}
    for prog, arg in (("iperf3", "--version"), ("wrk", "-v"), ("nginx", "-v"), ("socat", "-V")):
        try:
            p = subprocess.run([prog, arg], capture_output=True, text=True, timeout=5)
            vers[prog] = ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0][:60] if (p.stdout or p.stderr) else "?"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            vers[prog] = "absent"
    return f"{NCPU} CPUs ({model}), {mem}, kernel {kern}", vers


def write_results(h, cfg, out):
    """Writes RESULT.md, .json and .png; returns the .md's path."""
    paths, results, notes, failures, started, skipped = (out.paths, out.results, out.notes, out.failures,
                                                         out.started, out.skipped)
    date = datetime.datetime.utcnow().strftime("%Y-%m-%d")
    label = h.a.label or cfg.mode
    out_dir = h.a.out or os.path.join(ROOT, "bench/results")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{date}-{label}")
    mach, vers = machine_info()
    names = [p.name for p in paths]
    metrics = [m for m in WORKLOADS if any((n, m) in results for n in names)]

    def med(n, m):
        v = results.get((n, m))
        return statistics.median(v) if v else None

    L = []
    L.append(f"# graft bench — {label} ({date})\n")
    L.append(f"- Machine: {mach}; idle: {out.idle}")
    L.append("- Tools: " + "; ".join(f"{k}: {v}" for k, v in vers.items()))
    L.append(f"- Mode: `{cfg.mode}`, {cfg.runs} interleaved run(s) per cell (the paths' order rotated each run), {cfg.secs} s per iperf3/wrk cell; "
             f"started {started} UTC, finished {datetime.datetime.utcnow().strftime('%H:%M:%S')} UTC")
    L.append(f"- Command: `{' '.join(sys.argv)}`")
    L.append("- Cells are `median [min–max]` over the runs. Ratios are *performance relative to host*: "
             "value/host for rates, host/value for latencies, so **higher is better everywhere** "
             "(graft targets: ≥ 0.95 throughput, keep-alive, p50; ≥ 0.85 `Connection: close` and churn).")
    L.append("- `*` = the cell was still contaminated (other processes used > 10 % of a CPU during it) after re-runs.\n")
    if skipped:
        L.append("Skipped: " + "; ".join(skipped) + "\n")
    if failures:
        L.append("Failures: ")
        for f in failures:
            lines = [x for x in f.splitlines() if x.strip()]
            short = lines[0] if len(lines) < 3 else f"{lines[0]} … {lines[-1]}"
            L.append(f"- {short[:400]}")
        L.append("")
    L.append("## Paths\n")
    for p in paths:
        L.append(f"- `{p.name}`: {p.label}")
        d = getattr(p, "d", None)
        if d is not None:
            lines = [re.sub(r"^\[[^\]]*\]\s*", "", x) for x in d.log_text().splitlines()
                     if re.search(r"ebpf|eBPF|splic|companion", x)][:3]
            for x in lines:
                L.append(f"  - graftd: {x.strip()[:200]}")
    L.append("")
    L.append("## Results\n")
    hdr = "| path | " + " | ".join(f"{WORKLOADS[m][2]} ({WORKLOADS[m][0]})" for m in metrics) + " |"
    L.append(hdr)
    L.append("|" + "---|" * (len(metrics) + 1))
    for n in names:
        cells = []
        for m in metrics:
            v = results.get((n, m))
            if not v:
                cells.append("n/a")
                continue
            s = f"{fmt(statistics.median(v))} [{fmt(min(v))}–{fmt(max(v))}]"
            if notes.get((n, m)):
                s += "*"
            cells.append(s)
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("## Ratio to host (higher is better)\n")
    L.append("| path | " + " | ".join(m for m in metrics) + " |")
    L.append("|" + "---|" * (len(metrics) + 1))
    ratios = {}
    for n in names:
        cells = []
        for m in metrics:
            r = ratio(med(n, m), med("host", m), WORKLOADS[m][1])
            ratios[(n, m)] = r
            cells.append(f"{r:.2f}" if r else "n/a")
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    L.append("")
    own = [p for p in paths if p.baseline != "host" and p.baseline in names]
    if own:
        L.append("Against their own baseline (same ruleset on the host side):\n")
        L.append("| path ÷ baseline | " + " | ".join(metrics) + " |")
        L.append("|" + "---|" * (len(metrics) + 1))
        for p in own:
            cells = []
            for m in metrics:
                r = ratio(med(p.name, m), med(p.baseline, m), WORKLOADS[m][1])
                cells.append(f"{r:.2f}" if r else "n/a")
            L.append(f"| {p.name} ÷ {p.baseline} | " + " | ".join(cells) + " |")
        L.append("")
    micro_keys = [k for (n, k) in results if n == "micro"]
    if micro_keys:
        def mm(k):
            v = results.get(("micro", k))
            return (statistics.median(v), min(v), max(v)) if v else None
        L.append("## Preload library and broker cost\n")
        L.append("| loop | median [min–max] |")
        L.append("|---|---|")
        desc = {
            "send_plain": "sendto() on a UDP socket, no preload (ns/call)",
            "send_graft": "same, grafted socket under `graft -e` (ns/call)",
            "oob_plain": "sendto(MSG_OOB) → EOPNOTSUPP, no preload (ns/call; bare syscall)",
            "oob_graft": "same, grafted socket under `graft -e` (ns/call)",
            "sock_plain": "new UDP socket + first sendto + close, no preload (µs p50)",
            "sock_graft": "same under `graft -e`: one broker round trip each (µs p50)",
            "sock_plain_pin": "new socket loop, no preload, pinned cpu0 (µs p50)",
            "sock_graft_pin": "same under `graft -e`, client and graftd pinned to cpu0 (µs p50)",
            "sock_plain_mean": "new socket loop, no preload (µs mean)",
            "sock_graft_mean": "same under `graft -e` (µs mean)",
            "sock_plain_pin_mean": "pinned, no preload (µs mean)",
            "sock_graft_pin_mean": "pinned, under `graft -e` (µs mean)",
            "send_seccomp": "sendto() with address on a grafted socket, `--mode seccomp`: a notification each (ns/call)",
            "sock_seccomp": "new socket loop under `graft --mode seccomp` (µs p50)",
            "sock_seccomp_pin": "same, client and graftd pinned to cpu0 (µs p50)",
            "sock_seccomp_mean": "new socket loop, `--mode seccomp` (µs mean)",
            "sock_seccomp_pin_mean": "pinned, `--mode seccomp` (µs mean)",
        }
        for k in desc:
            v = mm(k)
            if v:
                L.append(f"| {desc[k]} | {fmt(v[0])} [{fmt(v[1])}–{fmt(v[2])}] |")
        d1 = mm("send_graft"), mm("send_plain")
        d2 = mm("oob_graft"), mm("oob_plain")
        d3 = mm("sock_graft"), mm("sock_plain")
        d4 = mm("sock_graft_pin"), mm("sock_plain_pin")
        L.append("")
        if all(d2):
            diff = d2[0][0] - d2[1][0]
            full = (f"; full sendto loop {d1[1][0]:.0f} → {d1[0][0]:.0f} ns, a difference inside that loop's "
                    "run-to-run spread") if all(d1) else ""
            if diff > 0:
                L.append(f"- Preload cost per intercepted call on a decided socket: **{diff:.1f} ns** "
                         f"(MSG_OOB loop, {d2[1][0]:.1f} → {d2[0][0]:.1f} ns{full}).")
            else:
                L.append(f"- Preload cost per intercepted call on a decided socket: **not measurable** "
                         f"(MSG_OOB loop, {d2[1][0]:.1f} ns without vs {d2[0][0]:.1f} ns with the library{full}).")
        if all(d3):
            L.append(f"- Broker cost per handed-out socket: **{d3[0][0] - d3[1][0]:.1f} µs** unpinned"
                     + (f", **{d4[0][0] - d4[1][0]:.1f} µs** with client and graftd on one CPU." if all(d4) else "."))
        d5 = mm("sock_seccomp"), mm("sock_plain")
        d6 = mm("sock_seccomp_pin"), mm("sock_plain_pin")
        d7 = mm("send_seccomp"), mm("send_plain")
        if all(d5):
            L.append(f"- seccomp path cost per new socket: **{d5[0][0] - d5[1][0]:.1f} µs** unpinned"
                     + (f", **{d6[0][0] - d6[1][0]:.1f} µs** on one CPU" if all(d6) else "")
                     + (f"; per sendto with an address on a decided socket: **{(d7[0][0] - d7[1][0]) / 1000:.1f} µs**"
                        if all(d7) else "") + ".")
        L.append("")
    png = base + ".png"
    chart_ok = chart(png, names, metrics, ratios)
    if chart_ok:
        L.append(f"![ratios to host]({os.path.basename(png)})\n")
    L.append("## Reading\n")
    L.append(reading(names, metrics, ratios, results))
    L.append("")
    L.append("## Exact commands\n")
    L.append("Setup and one client command per cell (first run; later runs repeat them). "
             "`graft-bench` is `target/release/graft-bench` (bench/src), graft's binaries come from "
             f"`{h.bin_dir or '-'}`.\n")
    L.append("```")
    seen = set()
    for sec, c in RUN.cmds:
        key = (sec, re.sub(r"\s+", " ", c))
        if key in seen or sec.startswith("micro") and key in seen:
            continue
        seen.add(key)
        L.append(f"[{sec}] {c}")
    L.append("```")
    with open(base + ".md", "w") as f:
        f.write("\n".join(L) + "\n")
    with open(base + ".json", "w") as f:
        json.dump({f"{k[0]}|{k[1]}": v for k, v in results.items()}, f, indent=1, sort_keys=True)
    return base + ".md"


def reading(names, metrics, ratios, results):
    """A short automatic reading; the human one is added to the committed file."""
    out = []
    g = "graft" if "graft" in names else None
    for m in metrics:
        parts = []
        for n in names:
            r = ratios.get((n, m))
            if r and n != "host":
                parts.append(f"{n} {r:.2f}")
        if parts:
            out.append(f"- {WORKLOADS[m][2]}: " + ", ".join(parts))
    if not g:
        out.append("\n**graft rows are missing from this run** (graftd/graft/ip-graft not built or not working yet).")
    return "\n".join(out)


def chart(png, names, metrics, ratios):
    if not shutil.which("gnuplot"):
        return False
    rows = [n for n in names if n != "host"]
    dat = os.path.join(RUN.tmp, "ratios.dat")
    with open(dat, "w") as f:
        f.write("metric " + " ".join(f'"{n}"' for n in rows) + "\n")
        for m in metrics:
            f.write(f'"{m}" ' + " ".join(f"{ratios.get((n, m)) or 0:.3f}" for n in rows) + "\n")
    colors = {"host+nat": "#7f7f7f", "veth": "#bcbd22", "dnat": "#8c564b", "proxy": "#e377c2", "socat": "#ffbb78",
              "graft": "#1f77b4", "graft+nat": "#17becf", "graft-g2g": "#aec7e8", "graft-g2g-nosplice": "#9edae5", "graft-nosplice": "#6baed6",
              "host-root": "#000000", "docker-proxy": "#ff7f0e", "docker-dnat": "#d62728",
              "docker-host": "#98df8a", "graft-docker": "#2ca02c"}
    plots = ", ".join(f"'{dat}' using {i + 2}" + (":xtic(1)" if i == 0 else "")
                      + f" title columnheader({i + 2})" + (f" lc rgb '{colors[n]}'" if n in colors else "")
                      for i, n in enumerate(rows))
    gp = f"""set terminal pngcairo size 1500,650 font ',10' noenhanced
set output '{png}'
set title 'graft bench: performance relative to host loopback (higher is better; 0 = not measured)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key outside right top
set arrow from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 2 lc rgb 'black'
set arrow from graph 0, first 0.95 to graph 1, first 0.95 nohead dt 3 lc rgb 'red'
plot {plots}
"""
    p = subprocess.run(["gnuplot"], input=gp, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        gp = gp.replace("pngcairo", "png")
        p = subprocess.run(["gnuplot"], input=gp, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        say(f"bench: gnuplot failed: {p.stderr.strip()[:300]}")
        return False
    return True


def replot(js):
    """bench/run --replot RESULT.json: redraws RESULT.png from saved samples."""
    with open(js) as f:
        raw = json.load(f)
    results = {tuple(k.split("|", 1)): v for k, v in raw.items()}
    order = [c.name for c in ALL_PATHS + DOCKER_PATHS]
    names = [n for n in order if any(k[0] == n for k in results)]
    metrics = [m for m in WORKLOADS if any((n, m) in results for n in names)]
    med = {k: statistics.median(v) for k, v in results.items() if v}
    ratios = {(n, m): ratio(med.get((n, m)), med.get(("host", m)), WORKLOADS[m][1]) for n in names for m in metrics}
    RUN.tmp = tempfile.mkdtemp(prefix="gb-replot-")
    try:
        ok = chart(js[:-5] + ".png", names, metrics, ratios)
    finally:
        shutil.rmtree(RUN.tmp, ignore_errors=True)
    return 0 if ok else 1

