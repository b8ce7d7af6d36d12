"""Progress bars that stay out of the book's pages.

In a notebook kernel ``sys.stderr`` (and file descriptor 2, which ipykernel redirects into a pipe)
is captured into the page. ``sys.stderr.fileno()`` is, by ipykernel's design, a copy of the
kernel's *original* stderr, inherited from the process that started it (``python -m report`` /
``make book``): bars written there show in that terminal and never in the rendered notebook.
When ipykernel captures no file descriptors (it does not under pytest) ``fileno()`` raises and
``sys.__stderr__``, left alone by the kernel, is the terminal. Outside a kernel both are the
process's ordinary stderr.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from typing import Any, TextIO

from tqdm import tqdm

# Libraries import tqdm.auto, which warns (into the page) that ipywidgets is missing; our bars do
# not use widgets, so the warning says nothing to a reader.
warnings.filterwarnings("ignore", message="IProgress not found")


_terminal: TextIO | None = None


def terminal() -> TextIO:
    """A text stream on the original stderr of this process (see the module docstring)."""
    global _terminal
    if _terminal is None:
        try:
            _terminal = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8",
                                  errors="replace")
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            # No file descriptor behind sys.stderr: an ipykernel that does not capture fds (it skips
            # that under pytest) or a captured stream. Then fd 2 is not the page: write there.
            return sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    return _terminal


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(...)`` writing to the terminal that runs the process, never into a notebook page."""
    kwargs.setdefault("file", terminal())
    return tqdm(*args, **kwargs)


def hide_library_bars() -> None:
    """Turn off transformers' own bars (per-tensor loading, shard writing): they would flood an
    executed notebook, and our bars already show the step that runs them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
