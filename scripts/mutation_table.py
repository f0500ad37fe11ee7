"""Run every planted bug of the mutation catalogue (tests/test_mutations.py) and print its table.

    python scripts/mutation_table.py                         # print the Markdown table
    python scripts/mutation_table.py --write docs/mutations.md

Each row: the bug, the backend it is planted in, the config (and fixture) it runs on, the tap where it
must first show, the tap the harness named end to end and the first tap that differs locally (its
stage fed the reference's inputs), who it blamed, and the margins (error over tolerance at the worst
element; 1 is on the edge) of the mutated backend end to end and locally and of the clean one. The
catalogue lives with the tests because every bug is planted through the documented seam (a model
subclass), never through a switch in the product code.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent


def load_catalogue():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("mutation_catalogue", ROOT / "tests" / "test_mutations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, object]]) -> str:
    keys = [k for k in rows[0] if k != "subtle"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        name = f"{row['bug']}{' (subtle)' if row.get('subtle') else ''}"
        lines.append("| " + " | ".join(fmt(name if k == "bug" else row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the table, with its date and command, into this file")
    args = parser.parse_args()
    catalogue = load_catalogue()
    results = {bug: catalogue.run_mutation(m) for bug, m in catalogue.MUTATIONS.items()}
    rows = catalogue.margin_table(results)
    text = table(rows)
    print(text)
    if args.write:
        from parity.atomic import write_text
        from parity.emulation import cpu_model

        head = args.write.read_text(encoding="utf-8").split("<!-- table -->")[0] if args.write.exists() else ""
        stamp = (
            f"<!-- table -->\nLatest table, {datetime.date.today().isoformat()}, {cpu_model()}, made by "
            f"`python scripts/mutation_table.py --write {args.write}`:\n\n"
        )
        write_text(args.write, head + stamp + text)
    missed = [
        r["bug"]
        for r in rows
        if not (r["reported tap"] == r["local tap"] == r["expected tap"] and r["blamed"] == r["backend"])
    ]
    if missed:
        print(f"not detected, localised and blamed as expected: {', '.join(map(str, missed))}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
