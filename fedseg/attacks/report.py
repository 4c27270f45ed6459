"""Where attack results go: ``attacks.md`` sections and an ``attacks`` key in metrics.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedseg.atomic import write_text_atomic

HEADER = (
    "# Attacks\n\nEach section is written by `fedseg attack --run DIR --attack NAME`; "
    "re-running an attack replaces its section.\n"
)


def figure_dir(run: Path) -> Path:
    return run / "figures" / "attacks"


def record(run: Path, name: str, result: dict, markdown: str) -> None:
    """Replace attack ``name``'s section in attacks.md and its entry in metrics.json."""
    md = run / "attacks.md"
    text = md.read_text() if md.is_file() else HEADER
    section = f"<!-- attack:{name} -->\n{markdown.strip()}\n<!-- /attack:{name} -->\n"
    pattern = re.compile(
        rf"<!-- attack:{re.escape(name)} -->.*?<!-- /attack:{re.escape(name)} -->\n", re.S
    )
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    _write(md, text)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.setdefault("attacks", {})[name] = result
    _write(metrics_path, json.dumps(metrics, indent=2))


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text, mode=0o644)


def table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
