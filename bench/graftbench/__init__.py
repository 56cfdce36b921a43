"""graft's benchmark harness (python3 stdlib only), driven by bench/run.

Modules: proc (commands, processes, teardown), load (idle wait, others' CPU),
paths (the namespace paths and a private graftd), docker (the Docker rows),
harness (what paths share, where binaries come from), workloads (the cells
and how one is measured), report (result files), cli (options, one run)."""
