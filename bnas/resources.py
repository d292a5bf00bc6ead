"""Where the shipped data folders (``primitives/``, ``search_spaces/``) live.

In a clone they are top-level folders that ``bnas/_data`` links to; in a built wheel the
links are resolved into real copies under ``bnas/_data``. Either way one path works.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent / "_data"


def resource_dir(name: str) -> Path:
    """The folder of shipped data ``name`` (``primitives`` or ``search_spaces``)."""
    path = _DATA / name
    if not path.is_dir():
        raise FileNotFoundError(f"bnas data folder {name!r} is missing at {path}; reinstall bnas")
    return path
