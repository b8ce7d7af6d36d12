"""Progress bars that stay out of the book's pages.

In a notebook kernel ``sys.stderr`` is captured into the page, but ``sys.__stderr__`` is the
kernel process's own stderr, inherited from the process that started it (``python -m report`` /
``make book``): bars written there show in that terminal and never in the rendered notebook.
Outside a kernel the two are the same stream.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from tqdm import tqdm

# Libraries import tqdm.auto, which warns (into the page) that ipywidgets is missing; our bars do
# not use widgets, so the warning says nothing to a reader.
warnings.filterwarnings("ignore", message="IProgress not found")


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(...)`` writing to the process's stderr (the terminal, not the notebook page)."""
    kwargs.setdefault("file", sys.__stderr__ if sys.__stderr__ is not None else sys.stderr)
    return tqdm(*args, **kwargs)
