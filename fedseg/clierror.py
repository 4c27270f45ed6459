"""One-line CLI errors: ``error: <what, naming the file or URL>`` on stderr, exit status 2
(:func:`fail_lines` for a message that lists several problems, one line each).

Rich would read ``[training]`` in a message as markup and drop it, and wrap a long message at
the terminal's width; the message is printed verbatim, on one line, so a user (or a script)
sees exactly what is wrong and where. No traceback: it would add nothing the message does not
say, and could show a secret held in a local variable.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as one error line; return the ``typer.Exit`` to raise (``from None``)."""
    err_console.print(f"[red]error:[/red] {escape(one_line(message))}")
    return typer.Exit(code=code)


def fail_lines(message: str, code: int = 2) -> typer.Exit:
    """Like :func:`fail`, for a message of several lines (e.g. the data check's, one line per
    problem): every line printed verbatim, none joined, wrapped or read as markup."""
    from fedseg.config import error_text

    lines = [line.rstrip() for line in str(message).splitlines() if line.strip()]
    err_console.print(error_text("\n".join(lines)))
    return typer.Exit(code=code)
