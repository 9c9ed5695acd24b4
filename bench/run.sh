#!/usr/bin/env bash
# `make bench`: every benchmark, each against the reference in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 bench/boot.py "$@"
python3 bench/snapshot.py
python3 bench/snapshot.py --with-disk --out bench/results/snapshot-disk.json
python3 bench/blk.py
python3 bench/migration.py
python3 bench/failover.py
