# Sourced by the A/B scripts here (PRE names their namespaces and brokers):
# a host namespace $hns, and for each variant V named in ab_graftds (its
# bin directory in $V) a namespace ${gns[V]} whose graftd (control $tmp/V.sock,
# log $tmp/V.log) runs in $hns and holds ep-out4; all removed on exit.
id=$$; hns=${PRE}h$id; tmp=$(mktemp -d)
declare -A gns gpid
cleanup() { for p in ${gpid[@]}; do kill $p 2>/dev/null; done; for ns in $hns ${gns[@]}; do for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null; done; ip netns del $ns 2>/dev/null; done; rm -rf $tmp; }
trap cleanup EXIT
ip netns add $hns; ip -n $hns link set lo up
# graft's environment for variant $1
ab_env() { echo GRAFT_CONTROL=$tmp/$1.sock GRAFT_BROKER=$PRE/$id/$1; }
ab_graftds() {
  for v in "$@"; do
    eval bin=\$$v; gns[$v]=$PRE$v$id; ip netns add ${gns[$v]}; ip -n ${gns[$v]} link set lo up
    nsenter --net=/run/netns/$hns $bin/graftd --control $tmp/$v.sock --broker-name $PRE/$id/$v 2>$tmp/$v.log & gpid[$v]=$!
    for _ in $(seq 100); do [ -S $tmp/$v.sock ] && break; sleep 0.05; done
    env $(ab_env $v) ip netns exec ${gns[$v]} $bin/ip-graft add ep-out4 type ipv4 addr 0.0.0.0 port dynamic
  done
}
