#!/usr/bin/env bash
# The servers the tests start themselves, installed from Debian's packages when missing:
# SLURM (slurmctld, slurmd) with munge for tests/test_slurm.py. PostgreSQL 15
# (tests/test_postgres_studies.py) comes with the project's machines. Needs root (apt-get).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test_services.sh: SLURM is missing and installing it needs root:" \
        "sudo apt-get install -y slurm-wlm munge" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q slurm-wlm munge >/dev/null || {
    apt-get update -q >/dev/null
    apt-get install -y -q slurm-wlm munge >/dev/null
}
