#!/bin/sh
# Init container of the graftd DaemonSet: puts graft-cni into the node's CNI
# bin directory, the launcher and the preload library into /var/lib/graft/bin
# (pods mount it at /graft), and chains graft-cni after the cluster's plugin
# (`graft-cni conflist`, settings from GRAFT_CNI_* in the environment).
set -eu
install -m 0755 /usr/local/bin/graft-cni /host/opt/cni/bin/graft-cni
install -d /host/var/lib/graft/bin
install -m 0755 /usr/local/bin/graft /host/var/lib/graft/bin/graft
install -m 0644 /usr/local/lib/graft/libgraft-convert.so /host/var/lib/graft/bin/libgraft-convert.so
# The cluster's plugin may write its configuration after we start: exit
# status 3 means "none yet" and is retried (for at most 5 minutes); anything
# else is final.
i=0
while :; do
	rc=0
	/usr/local/bin/graft-cni conflist /host/etc/cni/net.d "${GRAFT_CNI_CONFLIST:-00-graft.conflist}" || rc=$?
	[ "$rc" -eq 3 ] || exit "$rc"
	i=$((i + 1))
	[ "$i" -lt 60 ] || exit 1
	sleep 5
done
