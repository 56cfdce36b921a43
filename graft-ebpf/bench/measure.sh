#!/bin/bash
# Run as root from anywhere after `cargo build --workspace` and `cargo build --release -p graft-bench`.
# Two private graftds (one with --no-splice), namespaces gms1/gmc1 and gms2/gmc2, iperf3 and
# graft-bench servers; each cell waits for >= 95% idle CPU first. Everything is torn down on exit.
# Measures host vs graft (--no-splice) vs graft (splicing, the default) on loopback.
# Usage: gmeasure.sh ROUNDS SECS
R=${1:-3}; T=${2:-5}
B=/work/main/target/debug; RB=/work/main/target/release
W=/tmp/gm; rm -rf $W; mkdir -p $W/bin
ln -sf /work/main/iproute-graft/ip $W/bin/ip; for b in ip-graft graft graftd; do ln -sf $B/$b $W/bin/$b; done
export PATH=$W/bin:$PATH
cleanup() { for p in $W/*.pid; do kill $(cat $p) 2>/dev/null; done; sleep 0.5; for g in sp ns; do $B/graftd --control $W/$g.sock --state-dir $W/$g.state --pin-dir /sys/fs/bpf/gm-$g-$$ --cgroup gm-$g-$$ --remove 2>/dev/null; done; for n in gms1 gmc1 gms2 gmc2; do ip netns pids $n 2>/dev/null | xargs -r kill; ip netns del $n 2>/dev/null; done; }
trap cleanup EXIT
for n in gms1 gmc1 gms2 gmc2; do ip netns add $n; ip -n $n link set lo up; done
# graftd 1: splicing, the default (ports 1610x), graftd 2: --no-splice (ports 1620x)
start() { # tag args
  RUST_LOG=info $B/graftd --control $W/$1.sock --broker-name gm/$1 --state-dir $W/$1.state --pin-dir /sys/fs/bpf/gm-$1-$$ --cgroup gm-$1-$$ $2 > $W/$1.log 2>&1 & echo $! > $W/$1.pid; sleep 1; }
start sp ""; start ns --no-splice
env_of() { echo GRAFT_CONTROL=$W/$1.sock GRAFT_BROKER=gm/$1; }
for t in sp:1:1610 ns:2:1620; do IFS=: read tag i p <<<"$t"
  env $(env_of $tag) ip netns exec gms$i ip graft add ep-in type ipv4 addr 127.0.0.1 port ${p}1
  env $(env_of $tag) ip netns exec gms$i ip graft add ep-lat type ipv4 addr 127.0.0.1 port ${p}2
  env $(env_of $tag) ip netns exec gmc$i ip graft add ep-out type ipv4 addr 0.0.0.0 port dynamic
  env $(env_of $tag) ip netns exec gms$i graft -i 0.0.0.0:${p}1=ep-in -i :::${p}1=ep-in -- iperf3 -s -p ${p}1 > $W/iperf-$tag.log 2>&1 & echo $! > $W/ip$tag.pid
  env $(env_of $tag) ip netns exec gms$i graft -i 127.0.0.1:${p}2=ep-lat -- $RB/graft-bench server --listen 127.0.0.1:${p}2 > $W/srv-$tag.log 2>&1 & echo $! > $W/srv$tag.pid
done
iperf3 -s -B 127.0.0.1 -p 16001 > $W/iperf-host.log 2>&1 & echo $! > $W/iphost.pid
$RB/graft-bench server --listen 127.0.0.1:16002 > $W/srv-host.log 2>&1 & echo $! > $W/srvhost.pid
sleep 1
idle() { read -r _ a b c d e f g h _ < /proc/stat; t1=$((a+b+c+d+e+f+g+h)); i1=$d; sleep 1; read -r _ a b c d e f g h _ < /proc/stat; t2=$((a+b+c+d+e+f+g+h)); echo $(( 100 * (d - i1) / (t2 - t1) )); }
quiet() { for k in $(seq 1 120); do [ "$(idle)" -ge 95 ] && return 0; done; echo "(busy machine)" >&2; }
thr() { # prefix... -> Gbit/s
  quiet
  "$@" -t $T -J 2>/dev/null | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'; }
lat() { quiet; "$@" 2>&1 | tail -1; }
# pin CPUS: every latency server (all threads) on CPUS
pin() { for t in host sp ns; do taskset -a -p -c $1 $(cat $W/srv$t.pid) > /dev/null; done; }
for r in $(seq 1 $R); do
  echo "round $r load: $(cat /proc/loadavg)"
  echo "thr host        $(thr iperf3 -c 127.0.0.1 -p 16001)"
  echo "thr graft       $(thr env $(env_of ns) ip netns exec gmc2 graft -e 127.0.0.1/32=ep-out -- iperf3 -c 127.0.0.1 -p 16201)"
  echo "thr graft+splice $(thr env $(env_of sp) ip netns exec gmc1 graft -e 127.0.0.1/32=ep-out -- iperf3 -c 127.0.0.1 -p 16101)"
  echo "thr host->graft+splice $(thr iperf3 -c 127.0.0.1 -p 16101)"
  for t in iphost ipsp ipns; do taskset -a -p -c 0 $(cat $W/$t.pid) > /dev/null; done
  echo "thr1cpu host        $(thr taskset -c 0 iperf3 -c 127.0.0.1 -p 16001)"
  echo "thr1cpu graft       $(thr env $(env_of ns) ip netns exec gmc2 taskset -c 0 graft -e 127.0.0.1/32=ep-out -- iperf3 -c 127.0.0.1 -p 16201)"
  echo "thr1cpu graft+splice $(thr env $(env_of sp) ip netns exec gmc1 taskset -c 0 graft -e 127.0.0.1/32=ep-out -- iperf3 -c 127.0.0.1 -p 16101)"
  for t in iphost ipsp ipns; do taskset -a -p -c 0,1 $(cat $W/$t.pid) > /dev/null; done
  pin 0
  echo "lat1cpu host        $(lat taskset -c 0 $RB/graft-bench latency --connect 127.0.0.1:16002 --secs $T)"
  echo "lat1cpu graft       $(lat env $(env_of ns) ip netns exec gmc2 taskset -c 0 graft -e 127.0.0.1/32=ep-out -- $RB/graft-bench latency --connect 127.0.0.1:16202 --secs $T)"
  echo "lat1cpu graft+splice $(lat env $(env_of sp) ip netns exec gmc1 taskset -c 0 graft -e 127.0.0.1/32=ep-out -- $RB/graft-bench latency --connect 127.0.0.1:16102 --secs $T)"
  pin 0,1
  echo "lat host        $(lat $RB/graft-bench latency --connect 127.0.0.1:16002 --secs $T)"
  echo "lat graft       $(lat env $(env_of ns) ip netns exec gmc2 graft -e 127.0.0.1/32=ep-out -- $RB/graft-bench latency --connect 127.0.0.1:16202 --secs $T)"
  echo "lat graft+splice $(lat env $(env_of sp) ip netns exec gmc1 graft -e 127.0.0.1/32=ep-out -- $RB/graft-bench latency --connect 127.0.0.1:16102 --secs $T)"
done
for tag in sp ns; do env $(env_of $tag) ip netns exec gms${tag/sp/1} ip -s graft show 2>/dev/null; done
env $(env_of sp) ip netns exec gms1 ip -s graft show; env $(env_of ns) ip netns exec gms2 ip -s graft show
