#!/bin/bash
# A/B: graft-bench churn, grafted, before vs after binaries, interleaved; plain host client too
set -u
b4=/tmp/churn-before/bin; af=/work/wt/churn/target/release; gb=$af/graft-bench
PRE=gb-ab; . "$(dirname "$0")/ab-graftd.sh"
ip netns exec $hns $gb server --once --listen 127.0.0.1:29961 --secs 300 & sleep 0.3
ab_graftds b4 af
run() { v=$1; eval bin=\$$v; env $(ab_env $v) ip netns exec ${gns[$v]} $pin $bin/graft -e 0.0.0.0/0=ep-out4 -- $gb churn --connect 127.0.0.1:29961 --count 3000 --secs 3 | grep -o "conn_per_s=[0-9.]*"; }
for pin in "" "taskset -c 0"; do
 for r in 1 2 3; do
  echo "pin='$pin' host $(ip netns exec $hns $pin $gb churn --connect 127.0.0.1:29961 --count 3000 --secs 3 | grep -o 'conn_per_s=[0-9.]*') before $(run b4) after $(run af) load $(cut -d' ' -f1 /proc/loadavg)"
 done
done
