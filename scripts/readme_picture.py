"""Write docs/images/demo-trace.png, the README's picture: the heatmap that the README's `blip-trace trace` example
writes, as a 256-colour PNG (a third of the size, the same to the eye). Run it after a change to the figures;
tests/test_readme.py checks that the picture is still what the command writes.

    .venv/bin/python scripts/readme_picture.py
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PICTURE = ROOT / "docs" / "images" / "demo-trace.png"


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    command = next(c for c in re.findall(r"```bash\n(.*?)```", readme, re.S) if "blip-trace trace" in c)
    with tempfile.TemporaryDirectory() as folder:
        script = command.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, check=True)
        (written,) = Path(folder, "trace-output").glob("*.png")
        image = Image.open(written).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(PICTURE, optimize=True)
    print(f"wrote {PICTURE.relative_to(ROOT)} ({PICTURE.stat().st_size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
