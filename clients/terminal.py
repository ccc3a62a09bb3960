"""``zchat-client``: the command line, then the interactive or scriptable client.

``main`` only parses options (``zchat.clients.options``: every one also from
a ``ZCHAT_`` variable) and picks the mode: with a terminal on stdin and
stdout and no script options it runs the interactive client
(``zchat.clients.interactive``, which loads prompt_toolkit); otherwise the
scriptable one (``zchat.clients.script``), which starts faster because it
never imports prompt_toolkit. Both are built on ``zchat.Client``, the same
client core the bots use. Nothing imports this module back.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .options import EXIT_UNREACHABLE, EXIT_USAGE, Options, parse_options

__all__ = ["Options", "main", "parse_options"]


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    # Before any socket: a mistyped endpoint is one line, not a traceback,
    # and a host that does not resolve is said at once, not after a timeout.
    from zchat.client import resolve_endpoint

    try:
        resolve_endpoint(options.connect)
    except ValueError as exc:
        print(f"zchat-client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"zchat-client: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if options.interactive:
        from .interactive import run_interactive

        return run_interactive(options)
    from .script import run_script

    return run_script(options)


if __name__ == "__main__":
    sys.exit(main())
