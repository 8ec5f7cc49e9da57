"""Documentation corpora from Debian packages, shared by the knowledge and QA benchmarks.

Sphinx publishes its reStructuredText sources as ``html/_sources/*.rst.txt``; Debian's ``*-doc``
packages ship them. A package installed system-wide is used as it is; otherwise it is fetched
once with ``apt-get download`` and unpacked into ``~/.cache/chinwag/bench`` (no root needed).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "chinwag" / "bench"


def _sources(root: Path) -> Path | None:
    found = sorted(root.glob("usr/share/doc/*/html/_sources"))
    return found[0] if found else None


def debian_docs(package: str, folder: str | None = None) -> Path:
    """The ``_sources`` folder of a Debian documentation package.

    ``folder`` is the package's directory under /usr/share/doc when it differs from the
    package name (``python3.11-doc`` installs ``/usr/share/doc/python3.11``).
    """
    installed = Path("/usr/share/doc") / (folder or package) / "html" / "_sources"
    if installed.is_dir():
        return installed
    target = CACHE / package
    cached = _sources(target)
    if cached is not None:
        return cached
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
    cached = _sources(target)
    if cached is None:
        raise FileNotFoundError(f"{package} has no html/_sources folder")
    return cached
