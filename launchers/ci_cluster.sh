#!/usr/bin/env bash
# Run a command (the test suite) against a fresh local SLURM cluster, and stop the cluster's
# daemons by pid afterwards, whatever happened. For CI (as root):
#
#   bash launchers/ci_cluster.sh python -m pytest -q
#
# It installs Debian's slurm packages when missing, starts the cluster, exports SLURM_CONF and
# LRSWEEP_REQUIRE_SLURM=1 (tests/test_slurm.py then fails instead of skipping when the cluster
# is unusable), runs the command and exits with its status; when the cluster does not come up
# it exits non-zero without running the command. A cluster that was already running (same
# SLURM_ROOT) is used and left running.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -gt 0 ] || { echo "usage: bash $0 <command...>" >&2; exit 2; }

root=${SLURM_ROOT:-/tmp/lrsweep-slurm}
if [ -s "$root/run/slurmctld.pid" ] && kill -0 "$(cat "$root/run/slurmctld.pid")" 2>/dev/null; then
  echo "ci_cluster.sh: using the cluster already running under $root (it is left running)" >&2
else
  trap 'bash "$here/local_slurm.sh" down' EXIT
fi
line=$(FRESH=1 bash "$here/local_slurm.sh" up) || { echo "ci_cluster.sh: the local SLURM cluster did not come up" >&2; exit 1; }
eval "$line"                      # export SLURM_CONF=...
export SLURM_CONF LRSWEEP_REQUIRE_SLURM=1
"$@"
