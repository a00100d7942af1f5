"""Quiet commands: our own progress on the terminal, everything the toolchains print in a log.

The toolchains print from C++ (ExecuTorch, LiteRT, absl, ONNX's optimizer)
as well as from Python, to stdout as well as stderr, through ``print``,
logging and warnings. Silencing Python alone leaves the C++ lines, so
:func:`into_log` points file descriptors 1 and 2 at the log while a piece of
work runs. :class:`Console` keeps copies of the terminal's descriptors from
before, so progress lines and results still reach the user. ``pipeline``,
``export`` and ``convert`` all go through these two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class Console:
    """The terminal, kept aside while :func:`into_log` sends file descriptors 1 and 2 to a log.

    Args:
        bars: whether progress bars are drawn (a terminal); lines are written either way.
    """

    def __init__(self, bars: bool = False):
        self.bars = bars
        sys.stdout.flush()
        sys.stderr.flush()
        # Copies of descriptors 1 and 2 as they are now: into_log points the originals at the log.
        self.out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc) -> None:
        self.out.close()
        self.stream.close()

    def say(self, message: str) -> None:
        """One progress or failure line on the terminal's stderr, above any bar that is being drawn."""
        from tqdm import tqdm

        tqdm.write(message, file=self.stream)

    def result(self, line: str) -> None:
        """One result line on the terminal's stdout (what a script reads)."""
        self.out.write(line + "\n")

    def bar(self, total: int, desc: str):
        """A tqdm bar on the terminal, or None when bars are off."""
        if not self.bars:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="unit", file=self.stream, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def into_log(path: Path, title: str, console: Console, library_bars: bool = False) -> Iterator[None]:
    """Send everything printed inside the block to the log at ``path`` (appended, under a ``==== title`` line).

    File descriptors 1 and 2 are pointed at the log along with ``sys.stdout``,
    ``sys.stderr``, logging and warnings. With ``library_bars`` (and a console
    that draws bars), ``sys.stderr`` stays on the terminal for the libraries'
    tqdm bars.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log_file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    log_file.write(f"==== {title}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        sys.stdout = log_file
        sys.stderr = console.stream if library_bars and console.bars else log_file
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        sys.stdout, sys.stderr = saved_streams
        log_file.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        log_file.close()


def log_beside(out: str | os.PathLike, verb: str) -> Path:
    """The log of ``difftx-edge VERB --out OUT``: ``OUT.VERB.log`` next to OUT, not inside it.

    Inside, it would be one more entry among the bundles, and ``bench OUT/*``
    would take it for a bundle.
    """
    out = Path(out).resolve()
    return out.parent / f"{out.name}.{verb}.log"


def build_quietly(verb: str, out: str, build: Callable[..., list[dict]], line: Callable[[dict], dict]) -> int:
    """Run ``export`` or ``convert`` for the command line: results on stdout, failures on stderr, chatter logged.

    Each bundle is printed as one JSON line (``line(manifest)``) the moment it
    is written, each failed bundle as one line on stderr with its reason; the
    toolchains' own output goes to :func:`log_beside`.

    Args:
        verb: the command's verb, for its lines and its log's name.
        out: the ``--out`` folder.
        build: ``build(on_result=..., quiet=...)``: :func:`~difftx_edge.convert.export_run` or
            :func:`~difftx_edge.convert.convert_pt2` with every other argument bound.
        line: the JSON object printed for a written bundle.

    Returns:
        The exit code: 0, or 1 when any bundle failed (every other one is written).

    Raises:
        ValueError: bad input, found before anything was built (the caller's exit code 2).
    """
    import json

    from difftx_edge.convert.api import ExportFailed

    log_path = log_beside(out, verb)
    with Console() as console:
        def on_result(name: str, manifest: dict | None, reason: str | None) -> None:
            if manifest is not None:
                console.result(json.dumps(line(manifest)))
            else:
                console.say(f"difftx-edge {verb}: {reason}")

        try:
            manifests = build(on_result=on_result, quiet=lambda title: into_log(log_path, title, console))
        except ExportFailed as err:
            console.say(f"difftx-edge {verb}: {len(err.failures)} of {len(err.failures) + len(err.manifests)} "
                        f"bundles failed, the others are in {out}; the toolchains' output is in {log_path}")
            return 1
        console.say(f"difftx-edge {verb}: {len(manifests)} bundle(s) in {out}; the toolchains' output is in "
                    f"{log_path}")
    return 0
