#!/usr/bin/env bash
# Creates benchmarks/peers/.peers-venv with the peer methods and stmorph (for its section loaders and metrics),
# apart from the project's own .venv.
#   bash benchmarks/peers/setup.sh
# TORCH_INDEX= (empty) skips PyTorch's CPU index; PYTHON picks the interpreter (pybanksy needs Python < 3.14).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.peers-venv"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"

test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
py="$venv/bin/python"
# torch first, the CPU build, so no peer pulls a CUDA build; the CPU index where it can be reached, else pip's own
if [ -n "$TORCH_INDEX" ]; then
  "$py" -m pip install -q torch==2.13.0 --extra-index-url "$TORCH_INDEX" --timeout 15 --retries 1 \
    || "$py" -m pip install -q torch==2.13.0
else
  "$py" -m pip install -q torch==2.13.0
fi
"$py" -m pip install -q \
  "pybanksy==1.3.5" \
  "stagate-modern==1.0.0.post1" "torch-geometric==2.8.1" \
  "graphst-modern==1.1.1.post3" "pymclustr==0.2.1"
"$py" -m pip install -q -e "$root"
"$py" -m pip freeze > "$venv/freeze.txt"
echo "peers installed in $venv"
