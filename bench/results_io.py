"""Where a bench script writes its JSON (``--json PATH``, else ``$OUT/<name>`` on a lent GPU),
and the commit it ran at."""

from __future__ import annotations

import json
import os
import subprocess


def write_result(result: dict, path: str | None, default_name: str) -> str | None:
    out = path or (os.path.join(os.environ["OUT"], default_name) if os.environ.get("OUT")
                   else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    return out


def commit_id() -> str:
    """``$AFD_COMMIT`` (a GPU box's copy has no .git; the run scripts set it), else git's short
    HEAD of this checkout, else "unknown"."""
    if os.environ.get("AFD_COMMIT"):
        return os.environ["AFD_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return "unknown"
