"""Command-line plumbing shared by the scripts."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error (not a traceback) for a bad ``--config.*`` key."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        detail = str(e.args[0] if e.args else e)
        detail = " ".join(detail.replace("\\n", " ").replace("\\'", "").replace("'", "").split())
        sys.exit(f"error: unknown config key in a --config override: {detail}")
    except flags.Error as e:
        sys.exit(f"error: {e}")
