"""Files shipped inside installed PyPI distributions (offline models and data sets), located without
importing the distribution's own code."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path


def installed_file(dist_name: str, relative: str, needed_by: str, install_hint: str) -> Path:
    """The file ``relative`` inside the installed distribution ``dist_name``.

    ValueError (one line, with ``install_hint``) when the distribution is not installed or lacks the file;
    ``needed_by`` names what asked for it, e.g. "dataset 'sharegpt'".
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{needed_by} needs the {dist_name} package: {install_hint}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise ValueError(f"{dist_name} is installed but {path} is missing; reinstall it: {install_hint}")
    return path
