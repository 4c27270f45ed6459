"""Which SuperNode is which hospital: the operator's record, not what a node says of itself.

``fedseg deploy register KEY --site NAME`` admits a hospital's SuperNode key with Flower and
writes the node id Flower assigned, with the site name, to ``<deployment>/sites.json``. The
ServerApp, given that file (``federation.registry``), accepts a node's registration only under
the name recorded for its node id: a registered hospital cannot take part as another one, and
two nodes cannot hold one site. A simulation has no registry (its nodes are the run's own).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedseg.atomic import write_text_atomic

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RegistryError(ValueError):
    """The registry file is missing, unreadable, or would hold a conflicting entry."""


def check_site_name(name: str) -> str:
    """A site name names files and report rows: letters, digits, '.', '_', '-' (<= 64)."""
    if not SITE_NAME.fullmatch(name):
        raise ValueError(f"site name {name[:70]!r}: letters, digits, '.', '_', '-' (<= 64)")
    return name


def load_registry(path: str | Path) -> dict[int, str]:
    """node id -> site name, checked: valid names, each held by one node."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path}: no such registry (fedseg deploy register)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path}: not a readable registry: {err}") from None
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected an object of node id -> site name")
    registry: dict[int, str] = {}
    for node, site in raw.items():
        try:
            registry[int(node)] = check_site_name(str(site))
        except ValueError as err:
            raise RegistryError(f"{path}: entry {node!r}: {err}") from None
    names = list(registry.values())
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise RegistryError(f"{path}: site(s) {doubled} registered to more than one node")
    return registry


def check_free(path: str | Path, site: str, node_id: int | None = None) -> dict[int, str]:
    """The registry, if ``site`` is a valid name that no node other than ``node_id`` holds
    (a site already held: unregister that node with Flower and edit the file first)."""
    path = Path(path)
    check_site_name(site)
    registry = load_registry(path) if path.exists() else {}
    for node, name in registry.items():
        if name == site and node != node_id:
            raise RegistryError(f"{path}: site {site!r} is already registered as node {node}")
    return registry


def record_node(path: str | Path, node_id: int, site: str) -> dict[int, str]:
    """Add (or re-confirm) ``node_id`` as ``site``."""
    path = Path(path)
    registry = check_free(path, site, node_id)
    registry[int(node_id)] = site
    text = json.dumps({str(k): v for k, v in sorted(registry.items())}, indent=2) + "\n"
    write_text_atomic(path, text)
    return registry
