"""The set-up installs the CPU build of torch: PyTorch's CPU wheel index first, the plain pin only where that index
cannot be reached (saying so), and the torch installed here is a CPU build."""
from __future__ import annotations

import functools
import http.server
import os
import platform
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fast_subset import lengthy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install_torch.sh"


def _dry_run(index: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TORCH_INDEX": index}
    return subprocess.run(["bash", str(SCRIPT), sys.executable, "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=120, check=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: a connection is refused


def test_an_unreachable_index_falls_back_to_the_plain_pin_and_says_so():
    done = _dry_run(f"http://127.0.0.1:{_closed_port()}/whl/cpu")
    assert "cannot be reached" in done.stderr and "CUDA build" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "would run: pip install torch==2.13.0"


@lengthy
def test_a_reachable_index_is_asked_first(tmp_path: Path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"http://127.0.0.1:{server.server_address[1]}"
        done = _dry_run(index)
    finally:
        server.shutdown()
    assert "cannot be reached" not in done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"would run: pip install --index-url {index} torch==2.13.0"


def test_setup_installs_torch_only_through_the_cpu_index_script():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    torch_line = setup.index("bash scripts/install_torch.sh .venv/bin/python")
    assert torch_line < setup.index('pip install -e ".[test]"'), "torch must be installed before the project pulls it"
    assert not re.search(r"pip install[^\n]*[\"' ]torch[=\"' \n]", setup), "a plain torch install can pull CUDA"
    script = SCRIPT.read_text()
    default_index = re.search(r"INDEX=\$\{TORCH_INDEX:-(\S+)\}", script).group(1)
    binder = (ROOT / "binder" / "requirements.txt").read_text()
    assert f"--extra-index-url {default_index}" in binder, "Binder and the set-up ask the same CPU index"
    pinned = re.search(r"VERSION=\$\{TORCH_VERSION:-(\S+)\}", script).group(1)
    assert f"torch=={pinned}" in binder


@pytest.mark.skipif(platform.system() != "Linux", reason="PyTorch's CPU wheels carry '+cpu' on Linux only")
def test_the_installed_torch_is_the_cpu_build():
    import torch

    assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__} is not a CPU build: rerun scripts/setup.sh"
    assert torch.version.cuda is None
