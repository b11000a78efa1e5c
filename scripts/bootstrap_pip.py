"""Installs pip into a virtual environment made with --without-pip, from PyPI's own pip wheel (no root needed).

For a Python whose ``ensurepip`` was left out (Debian's python3 without python3-venv) on a machine where
apt needs root: ``python3 -m venv --without-pip .venv && .venv/bin/python scripts/bootstrap_pip.py``.
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/").removesuffix("/simple")


def newest_pip_wheel() -> tuple[str, str]:
    """(file name, URL) of the newest pip wheel, from the index's JSON API (a mirror may give URLs relative to it)."""
    api = f"{INDEX}/pypi/pip/json"
    with urllib.request.urlopen(api, timeout=60) as response:
        release = json.load(response)
    wheel = next(f for f in release["urls"] if f["packagetype"] == "bdist_wheel")
    return wheel["filename"], urllib.parse.urljoin(api, wheel["url"])


def main() -> int:
    if sys.prefix == sys.base_prefix:
        print("error: run this with the virtual environment's Python, not the system's", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        try:
            name, url = newest_pip_wheel()
            wheel = os.path.join(scratch, name)
            urllib.request.urlretrieve(url, wheel)
        except (OSError, ValueError, KeyError, StopIteration) as e:
            print(f"error: could not fetch pip's wheel from {INDEX}: {e}", file=sys.stderr)
            return 1
        # a wheel is a zip that Python can run: pip installs itself from its own wheel
        return subprocess.call([sys.executable, os.path.join(wheel, "pip"), "install", "--quiet", "--no-index", wheel])


if __name__ == "__main__":
    sys.exit(main())
