"""What every stage's ``main()`` shares: logging once, exit codes, one line on failure."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from shared.core.cli import error_line
from shared.core.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRY, LawtuneError

log = logging.getLogger("lawtune")


def run_main(command: str, body: Callable[[], object]) -> int:
    """Run ``body`` and map its outcome to the stage interface's exit codes.

    Known failures end with exactly one line on stderr: ``lawtune <command>: error: <what>``, as
    argparse's own errors (shared/core/cli.py) (a multi-line config report stays together,
    prefixed once).
    """
    try:
        body()
    except LawtuneError as exc:
        print(error_line(command, exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(error_line(command, "interrupted"), file=sys.stderr)
        return EXIT_RETRY
    except (OSError, TimeoutError) as exc:
        log.debug("I/O failure", exc_info=True)
        print(error_line(command, f"I/O failure, worth retrying: {exc}"), file=sys.stderr)
        return EXIT_RETRY
    except Exception as exc:  # last resort: keep the traceback in the log, one line on stderr
        log.exception("unexpected failure")
        print(error_line(command, f"unexpected {type(exc).__name__}: {exc}"), file=sys.stderr)
        return EXIT_RETRY
    return EXIT_OK


__all__ = ["run_main", "EXIT_OK", "EXIT_RETRY", "EXIT_CONFIG"]
