#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch first, from PyTorch's CPU wheel index (a bare `torch`
# can pull a multi-GB CUDA build; scripts/install_torch.sh), then this project with its test extras. Safe to run again.
#   bash scripts/setup.sh            # the package and its command line
#   bash scripts/setup.sh --browser  # also Debian's chromium, for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
bash scripts/install_torch.sh .venv/bin/python  # the CPU build: PyTorch's CPU index first
pip install -e ".[test]"
# ipywidgets 7.7.5 (which Colab has shipped) beside the venv, for tests/test_widgets_ipywidgets7.py:
# installed here so that the test never reaches the package index while it runs
[ -d .venv/ipywidgets7/ipywidgets ] || pip install --target .venv/ipywidgets7 --no-deps "ipywidgets==7.7.5" "ipython_genutils==0.2.0"
# transformers 4.40.2 (the oldest pyproject.toml allows) beside the venv, for tests/test_transformers4.py
[ -d .venv/transformers4/transformers ] || pip install --target .venv/transformers4 --no-deps \
  "transformers==4.40.2" "tokenizers==0.19.1" "huggingface_hub==0.24.6"
# notebooks are committed without outputs: git strips them on commit (see .gitattributes)
if git rev-parse --git-dir >/dev/null 2>&1; then
  git config filter.strip-outputs.clean "python3 scripts/strip_notebook_outputs.py"
  git config filter.strip-outputs.smudge cat
fi
if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: chromium could not be installed; the browser tests will be skipped"
  else
    echo "setup: installing chromium needs root and apt-get; the browser tests will be skipped"
  fi
fi
