"""Command-line subcommands; each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.

Register a new command by adding its module name to ``earlyprop.cli.COMMANDS``.
"""

import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """JSON has no NaN/inf: non-finite floats (e.g. the cosine of a layer that never moved) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
