"""`python -m bench` (`make bench`): list the benchmarks; each runs on its own as `python -m bench.<name>`."""
from __future__ import annotations

import ast
from pathlib import Path


def main() -> None:
    print("Benchmarks (each prints its figure beside a baseline run in the same process):\n")
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem.startswith("_") or path.stem == "common":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        print(f"  .venv/bin/python -m bench.{path.stem:<16} {first}")


if __name__ == "__main__":
    main()
