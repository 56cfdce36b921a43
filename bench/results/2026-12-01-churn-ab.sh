#!/bin/bash
# A/B: graft-bench churn, grafted, before vs after binaries, interleaved; plain host client too
set -u
b4=/tmp/churn-before/bin; af=/work/wt/churn/target/release; gb=$af/graft-bench
id=$$; hns=gb-abh$id; tmp=$(mktemp -d)
declare -A gns gpid
cleanup() { for p in ${gpid[@]}; do kill $p 2>/dev/null; done; for ns in $hns ${gns[@]}; do for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null; done; ip netns del $ns 2>/dev/null; done; rm -rf $tmp; }
trap cleanup EXIT
ip netns add $hns; ip -n $hns link set lo up
ip netns exec $hns $gb server --once --listen 127.0.0.1:29961 --secs 300 & sleep 0.3
for v in b4 af; do
  eval bin=\$$v; gns[$v]=gb-ab$v$id; ip netns add ${gns[$v]}; ip -n ${gns[$v]} link set lo up
  nsenter --net=/run/netns/$hns $bin/graftd --control $tmp/$v.sock --broker-name gb-ab/$id/$v 2>$tmp/$v.log & gpid[$v]=$!
  for _ in $(seq 100); do [ -S $tmp/$v.sock ] && break; sleep 0.05; done
  GRAFT_CONTROL=$tmp/$v.sock GRAFT_BROKER=gb-ab/$id/$v ip netns exec ${gns[$v]} $bin/ip-graft add ep-out4 type ipv4 addr 0.0.0.0 port dynamic
done
run() { v=$1; eval bin=\$$v; GRAFT_CONTROL=$tmp/$v.sock GRAFT_BROKER=gb-ab/$id/$v ip netns exec ${gns[$v]} $pin $bin/graft -e 0.0.0.0/0=ep-out4 -- $gb churn --connect 127.0.0.1:29961 --count 3000 --secs 3 | grep -o "conn_per_s=[0-9.]*"; }
for pin in "" "taskset -c 0"; do
 for r in 1 2 3; do
  echo "pin='$pin' host $(ip netns exec $hns $pin $gb churn --connect 127.0.0.1:29961 --count 3000 --secs 3 | grep -o 'conn_per_s=[0-9.]*') before $(run b4) after $(run af) load $(cut -d' ' -f1 /proc/loadavg)"
 done
done
