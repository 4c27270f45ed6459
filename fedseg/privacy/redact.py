"""What a hospital's error may tell the server: its kind and a short message, no paths.

A client's exception text travels to the coordinator (Flower sends it as the reply's error
reason). Messages name files, and a hospital's file paths say how its archive is organised,
sometimes with patient or study identifiers in them. The site's own log keeps the full error.
"""

from __future__ import annotations

import re

MAX_CHARS = 200
# Anything with a slash or backslash in it: absolute, relative, home and Windows paths.
_PATH = re.compile(r"(?:[A-Za-z]:)?[\w.~-]*(?:[/\\][\w.~-]*)+")


class SiteError(RuntimeError):
    """A site's failure as the server sees it."""


def public_error(err: BaseException) -> str:
    """``"<ExceptionType>: <message with paths replaced>"``, at most ``MAX_CHARS``."""
    text = " ".join(str(err).split())  # one line: no traceback layout
    text = _PATH.sub("<path>", text)
    summary = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return summary if len(summary) <= MAX_CHARS else summary[: MAX_CHARS - 3] + "..."
