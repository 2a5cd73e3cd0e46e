"""Strip a notebook's outputs and execution counts: a git "clean" filter (stdin to stdout), or in place.

    python scripts/strip_notebook_outputs.py < run.ipynb > clean.ipynb
    python scripts/strip_notebook_outputs.py notebooks/*.ipynb        # in place

`scripts/setup.sh` registers it as the `strip-outputs` filter that `.gitattributes` names for
`*.ipynb`, so running a notebook inside the repository never commits its outputs.
"""
from __future__ import annotations

import json
import sys


def strip(text: str) -> str:
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(paths: list[str]) -> None:
    if not paths:
        sys.stdout.write(strip(sys.stdin.read()))
        return
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(strip(text))


if __name__ == "__main__":
    main(sys.argv[1:])
