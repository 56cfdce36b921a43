#!/bin/bash
# A/B: wrk -c32 Connection: close as the egress client, host vs graftd A vs graftd B, interleaved
set -u
A=${A:-/tmp/churn-nostock/bin}; B=${B:-/tmp/churn-stock/bin}
PRE=gb-aw; . "$(dirname "$0")/ab-graftd.sh"
mkdir -p $tmp/www; python3 -c "print('<html><body>' + 'graft bench ' * 48 + '</body></html>')" > $tmp/www/index.html
cat > $tmp/nginx.conf <<C
daemon off; master_process on; worker_processes 1; pid $tmp/nginx.pid; error_log $tmp/error.log warn;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:29970 backlog=4096; root $tmp/www; } }
C
ip netns exec $hns taskset -c 1 nginx -c $tmp/nginx.conf -e $tmp/nginx.err & sleep 0.5
ab_graftds A B
W=(wrk -t1 -c32 -d3s -H "Connection: close" http://127.0.0.1:29970/)
rate() { awk '/Requests\/sec/{print $2}'; }
run() { v=$1; eval bin=\$$v; env $(ab_env $v) ip netns exec ${gns[$v]} $bin/graft -e 0.0.0.0/0=ep-out4 -- taskset -c 0 "${W[@]}" | rate; }
for r in $(seq ${ROUNDS:-3}); do
  echo "round $r host $(ip netns exec $hns taskset -c 0 "${W[@]}" | rate) A $(run A) B $(run B) load $(cut -d' ' -f1 /proc/loadavg)"
done
