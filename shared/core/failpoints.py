"""Named points inside the commits where a fault test stops the process, so a kill lands exactly there.

    LAWTUNE_FAILPOINTS=commit:preprocess,promote:swapped python -m jobs.publish ...

A commit is a few store writes in a fixed order (the files, then ``MANIFEST.json``; ``PROMOTED``,
then its history record). A kill timed from outside lands between two of them only by luck, so
the code names the gaps (as etcd's gofail and FreeBSD's fail points do) and the kill tests
(tests/faults/) arm them: an armed point prints ``failpoint <name>: stopped`` on stderr and
stops its own process with SIGSTOP; the test then SIGKILLs it (a crash there) or SIGCONTs it
(a pause there, e.g. a reader overtaken by a writer). Unarmed, a point costs one dict lookup.

The points: ``commit:<stage>`` after a stage's files are stored and before its manifest
(``<stage>`` as the manifest records it: data, finetune, finetune-checkpoint, evaluate,
publish); ``promote:swapped`` after ``PROMOTED`` moved and before its history record;
``fetch:verified`` after a fetch verified every file and before it renames the folder into
place; ``fetch:manifest-read`` after a reader read a manifest and before it downloads the files.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "LAWTUNE_FAILPOINTS"


def failpoint(name: str) -> None:
    """Stop here when ``name`` is armed in ``LAWTUNE_FAILPOINTS`` (comma-separated)."""
    armed = os.environ.get(ENV)
    if not armed or name not in armed.split(","):
        return
    print(f"failpoint {name}: stopped", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
