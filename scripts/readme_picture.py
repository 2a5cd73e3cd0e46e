"""Write docs/images/demo-trace.png, the README's picture: the heatmap that the README's `blip-trace trace` example
writes, as a 256-colour PNG where that moves no pixel by more than 8 of 255 (a third of the size). Run it after a
change to the figures; tests/test_readme.py checks that the picture is still what the command writes.

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


def smallest_faithful_png(image: Image.Image, tolerance: int = 8) -> bytes:
    """The image as a 256-colour PNG whose every pixel is within ``tolerance`` of the original (of the palettes
    Pillow can make, the most faithful), or as a full-colour PNG when none is."""
    import io

    import numpy as np

    original = np.asarray(image, dtype=int)
    candidates = []
    for method in (Image.Quantize.MAXCOVERAGE, Image.Quantize.MEDIANCUT, Image.Quantize.FASTOCTREE):
        quantized = image.quantize(colors=256, method=method, dither=Image.Dither.NONE)
        error = int(np.abs(np.asarray(quantized.convert("RGB"), dtype=int) - original).max())
        candidates.append((error, quantized))
    error, best = min(candidates, key=lambda c: c[0])
    buffer = io.BytesIO()
    (best if error <= tolerance else image).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    command = next(c for c in re.findall(r"```bash\n(.*?)```", readme, re.S) if "blip-trace trace" in c)
    with tempfile.TemporaryDirectory() as folder:
        script = command.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, check=True)
        (written,) = Path(folder, "trace-output").glob("*.png")
        image = Image.open(written).convert("RGB")
    PICTURE.write_bytes(smallest_faithful_png(image))
    print(f"wrote {PICTURE.relative_to(ROOT)} ({PICTURE.stat().st_size / 1000:.0f} kB)")


if __name__ == "__main__":
    main()
