#!/usr/bin/env python3
"""Writes a conflist chaining graft-cni after the cluster's own plugins.

usage: write-conflist.py NETD_DIR OUT_NAME

Takes the first *.conflist (or *.conf) in NETD_DIR by name that is not
OUT_NAME itself, appends graft-cni to its plugin list (once), and writes
the result to NETD_DIR/OUT_NAME, which sorts first so the runtime picks it.
graft-cni's own settings come from the environment:
  GRAFT_CNI_ENDPOINTS  JSON list of endpoints (ip graft add's fields), default []
  GRAFT_CNI_EGRESS / GRAFT_CNI_INGRESS / GRAFT_CNI_EXCLUDE  JSON lists of rules
  GRAFT_CNI_CONTROL    graftd's control socket (default /run/graft/graftd.sock)
Exits 1 with one line when no cluster configuration is found yet (the
DaemonSet's init container then retries).
"""
import json
import os
import sys


def main():
    if len(sys.argv) != 3:
        print("usage: write-conflist.py NETD_DIR OUT_NAME", file=sys.stderr)
        return 2
    netd, out = sys.argv[1], sys.argv[2]
    names = sorted(
        n for n in os.listdir(netd)
        if n != out and (n.endswith(".conflist") or n.endswith(".conf"))
    )
    if not names:
        print(f"write-conflist: no CNI configuration in {netd} yet", file=sys.stderr)
        return 1
    with open(os.path.join(netd, names[0])) as f:
        conf = json.load(f)
    if "plugins" not in conf:  # a single-plugin .conf
        single = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
        conf = {"cniVersion": conf.get("cniVersion", "1.0.0"),
                "name": conf["name"], "plugins": [single]}
    plugins = [p for p in conf["plugins"] if p.get("type") != "graft-cni"]
    graft = {
        "type": "graft-cni",
        "capabilities": {"portMappings": True},
        "controlSocket": os.environ.get("GRAFT_CNI_CONTROL", "/run/graft/graftd.sock"),
        "endpoints": json.loads(os.environ.get("GRAFT_CNI_ENDPOINTS", "[]")),
    }
    for key in ("ingress", "egress", "exclude"):
        v = os.environ.get("GRAFT_CNI_" + key.upper())
        if v:
            graft[key] = json.loads(v)
    # portmap would also claim the host ports graft-cni grafts.
    plugins = [p for p in plugins if p.get("type") != "portmap"]
    conf["plugins"] = plugins + [graft]
    tmp = os.path.join(netd, "." + out + ".tmp")
    with open(tmp, "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    os.rename(tmp, os.path.join(netd, out))
    print(f"write-conflist: {out} chains graft-cni after {names[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
