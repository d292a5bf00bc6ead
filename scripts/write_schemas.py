"""Regenerate docs/schemas/{genotype,space,recipe,catalog}.schema.json from bnas.schemas.

    python scripts/write_schemas.py          # write the files
    python scripts/write_schemas.py --check  # exit 1 if a committed file is stale

tests/test_schemas.py fails when a file differs from what the models emit, so run this
after changing a schema and commit the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnas.atomic import write_text_atomic
from bnas.schemas import KINDS, json_schema_text

OUT = Path(__file__).resolve().parents[1] / "docs" / "schemas"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for kind in KINDS:
        path = OUT / f"{kind}.schema.json"
        text = json_schema_text(kind)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
