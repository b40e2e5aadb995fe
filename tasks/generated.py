"""Generated data sets carry the settings they were drawn with: ``generator.json`` in their folder.

A folder with that manifest was made by this project's generators, and is generated again when
other settings are asked for, so stale files are never reused silently. A folder without one (the
LRA release's, or data generated before manifests existed) is never overwritten. Generators write
into a hidden ``.<name>.partial`` sibling that takes the folder's place only once complete, so a
crash never leaves half a data set under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.errors import DataFormatError

MANIFEST = "generator.json"


def normal(settings: dict) -> dict:
    """``settings`` as its JSON round trip gives it back (tuples become lists), for comparison."""
    return json.loads(json.dumps(settings))


def recorded(folder: Path) -> dict | None:
    """The settings in ``folder``'s manifest; None without one, {} for one that cannot be read
    (which then differs from any settings: only the generators write it)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def is_current(final: Path, settings: dict, what: str) -> bool:
    """Whether ``final`` already holds ``what`` generated with ``settings``; False when it is
    missing or was generated with other ones. Data without a manifest raises: it is not ours to
    replace."""
    if not final.exists():
        return False
    have = recorded(final)
    if have is None:
        raise DataFormatError(
            f"{final} holds {what} data without {MANIFEST} (the LRA release's, or generated before settings were "
            "recorded), which is never overwritten; move it away or generate into another folder (--out)"
        )
    return have == normal(settings)


def staging(final: Path) -> Path:
    """The hidden sibling a generator writes ``final`` into."""
    return final.with_name(f".{final.name}.partial")


def publish(work: Path, final: Path, settings: dict) -> Path:
    """Record ``settings`` in the complete ``work`` folder and put it in place of ``final``."""
    (work / MANIFEST).write_text(json.dumps(normal(settings), sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)  # a stale generated copy: is_current() refused anything else
    os.replace(work, final)
    return final
