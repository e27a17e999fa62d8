"""Write (or check) the JSON Schema files of every persisted document: ``python -m nestprune.schemas.export [--check]``."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from nestprune.schemas import SCHEMA_MODULES

HERE = Path(__file__).parent
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def documents() -> dict[str, type[BaseModel]]:
    docs: dict[str, type[BaseModel]] = {}
    for name in SCHEMA_MODULES:
        docs.update(importlib.import_module(name).DOCUMENTS)
    return docs


def render(model: type[BaseModel]) -> str:
    schema = {"$schema": DRAFT, **model.model_json_schema()}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for stem, model in documents().items():
        path = HERE / f"{stem}.schema.json"
        text = render(model)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale JSON Schema files (run `make schemas`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
