"""Regenerate README's quality tables from the committed benchmark files.

    python -m simulations.readme_tables [README.md]

Every block between `<!-- quality-<scenario> table: ... -->` (or `paired`) and
`<!-- end of quality-<scenario> table -->` is replaced with `python -m simulations.quality
--table benchmarks/results/quality-<scenario>[-paired].csv`, so the README never holds a
hand-copied number.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cl_fed.io import atomic_write_text
from simulations.quality import render_table

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"(<!-- quality-(?P<scenario>[\w.-]+) (?P<kind>table|paired):[^\n]*-->\n).*?"
    r"(<!-- end of quality-(?P=scenario) (?P=kind) -->)",
    re.S,
)


def csv_for(scenario: str, kind: str) -> Path:
    suffix = "-paired" if kind == "paired" else ""
    return ROOT / "benchmarks" / "results" / f"quality-{scenario}{suffix}.csv"


def update(text: str) -> str:
    def table(match: re.Match) -> str:
        path = csv_for(match["scenario"], match["kind"])
        if not path.is_file():
            raise SystemExit(f"README block quality-{match['scenario']} {match['kind']}: {path} not found")
        return f"{match[1]}{render_table(path).strip()}\n{match[4]}"

    return BLOCK.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    readme = Path(args[0]) if args else ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = update(text)
    if new != text:
        atomic_write_text(readme, new)
    print(f"{readme}: {len(BLOCK.findall(text))} quality blocks {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
