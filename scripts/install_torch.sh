#!/usr/bin/env bash
# Install the CPU build of torch into a Python environment: PyTorch's CPU wheel index first (a bare
# `pip install torch` on Linux pulls the CUDA build and about 20 nvidia packages, several GB), and
# the plain pin from the default index only where that index cannot be reached, saying so.
#   bash scripts/install_torch.sh .venv/bin/python             # install
#   bash scripts/install_torch.sh .venv/bin/python --dry-run   # print the pip command it would run
# TORCH_INDEX overrides the CPU index (a mirror), TORCH_VERSION the pin.
set -euo pipefail
PYTHON=${1:?usage: install_torch.sh PYTHON [--dry-run]}
DRY_RUN=${2:-}
INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
VERSION=${TORCH_VERSION:-2.13.0}

reachable() {  # the index answers for torch within 20 s (a machine without the internet fails at once)
  "$PYTHON" - "$1" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=20).close()
except Exception as error:  # DNS, refusal, timeout, HTTP error: all mean "not from here"
    print(f"({type(error).__name__}: {error})", file=sys.stderr)
    sys.exit(1)
EOF
}

run() {
  if [ "$DRY_RUN" = "--dry-run" ]; then echo "would run: pip install $*"; return 0; fi
  "$PYTHON" -m pip --disable-pip-version-check -q install "$@"
}

if reachable "$INDEX"; then
  echo "install_torch: torch==$VERSION, CPU build, from $INDEX"
  if ! run --index-url "$INDEX" "torch==$VERSION"; then
    echo "install_torch: $INDEX failed to install torch==$VERSION; falling back to the default index" >&2
    run "torch==$VERSION"
  fi
else
  echo "install_torch: PyTorch's CPU wheel index ($INDEX) cannot be reached from here;" \
       "installing torch==$VERSION from the default index instead (on Linux without a local CPU wheel" \
       "this can be the CUDA build, several GB; set TORCH_INDEX to a reachable mirror of the CPU index)" >&2
  run "torch==$VERSION"
fi
[ "$DRY_RUN" = "--dry-run" ] || "$PYTHON" -c "import torch; print('install_torch: torch', torch.__version__)"
