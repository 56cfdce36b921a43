#!/bin/bash
# A/B: wrk -c32 Connection: close as the egress client, host vs graftd A vs graftd B, interleaved
set -u
A=${A:-/tmp/churn-nostock/bin}; B=${B:-/tmp/churn-stock/bin}
id=$$; hns=gb-awh$id; tmp=$(mktemp -d)
declare -A gns gpid
cleanup() { for p in ${gpid[@]}; do kill $p 2>/dev/null; done; for ns in $hns ${gns[@]}; do for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null; done; ip netns del $ns 2>/dev/null; done; rm -rf $tmp; }
trap cleanup EXIT
ip netns add $hns; ip -n $hns link set lo up
mkdir -p $tmp/www; python3 -c "print('<html><body>' + 'graft bench ' * 48 + '</body></html>')" > $tmp/www/index.html
cat > $tmp/nginx.conf <<C
daemon off; master_process on; worker_processes 1; pid $tmp/nginx.pid; error_log $tmp/error.log warn;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:29970 backlog=4096; root $tmp/www; } }
C
ip netns exec $hns taskset -c 1 nginx -c $tmp/nginx.conf -e $tmp/nginx.err & sleep 0.5
for v in A B; do
  eval bin=\$$v; gns[$v]=gb-aw$v$id; ip netns add ${gns[$v]}; ip -n ${gns[$v]} link set lo up
  nsenter --net=/run/netns/$hns $bin/graftd --control $tmp/$v.sock --broker-name gb-aw/$id/$v 2>$tmp/$v.log & gpid[$v]=$!
  for _ in $(seq 100); do [ -S $tmp/$v.sock ] && break; sleep 0.05; done
  GRAFT_CONTROL=$tmp/$v.sock GRAFT_BROKER=gb-aw/$id/$v ip netns exec ${gns[$v]} $bin/ip-graft add ep-out4 type ipv4 addr 0.0.0.0 port dynamic
done
W=(wrk -t1 -c32 -d3s -H "Connection: close" http://127.0.0.1:29970/)
rate() { awk '/Requests\/sec/{print $2}'; }
run() { v=$1; eval bin=\$$v; GRAFT_CONTROL=$tmp/$v.sock GRAFT_BROKER=gb-aw/$id/$v ip netns exec ${gns[$v]} $bin/graft -e 0.0.0.0/0=ep-out4 -- taskset -c 0 "${W[@]}" | rate; }
for r in $(seq ${ROUNDS:-3}); do
  echo "round $r host $(ip netns exec $hns taskset -c 0 "${W[@]}" | rate) A $(run A) B $(run B) load $(cut -d' ' -f1 /proc/loadavg)"
done
