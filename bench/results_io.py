"""Where a bench script writes its JSON: ``--json PATH``, else ``$OUT/<name>`` on a lent GPU."""

from __future__ import annotations

import json
import os


def write_result(result: dict, path: str | None, default_name: str) -> str | None:
    out = path or (os.path.join(os.environ["OUT"], default_name) if os.environ.get("OUT")
                   else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    return out
