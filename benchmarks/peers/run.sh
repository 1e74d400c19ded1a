#!/usr/bin/env bash
# The peers' benchmark in one command, from the repository root:
#   bash benchmarks/peers/run.sh                 # HER2ST: all peers; DLPFC: BANKSY; 3 seeds -> results.csv + table
#   bash benchmarks/peers/run.sh --heavy         # also STAGATE and GraphST on DLPFC (long on CPU)
#   bash benchmarks/peers/run.sh --table         # print the table of results.csv
# Other arguments go to run_peers.py (--data, --methods, --only, --seeds, --out, --force).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
test -x "$here/.peers-venv/bin/python" || bash "$here/setup.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec nice -n "${NICE:-19}" "$here/.peers-venv/bin/python" "$here/run_peers.py" "$@"
