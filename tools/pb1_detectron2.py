#!/usr/bin/env python
"""Fetch the detectron2 v0.6 fallback (the ``pb1-detectron2==0.6`` sdist) as buildable sources.

Downloads the sdist from PyPI (pip cannot: its metadata declares a direct-URL extra that PyPI
rejects), checks its sha256, unpacks it into DEST, disables its C++ extension (its setup.py
always declares ``detectron2._C``, whose sources it does not ship) and drops its stale pins
(``black==21.4b2`` for a formatter any black does, ``future``/``pydot`` for Caffe2, which PyTorch 2
has no more), so that later ``pip install`` calls print no dependency-resolver ERROR. Prints the source folder, to be
given to ``pip install`` (tools/setup.sh) or ``pip wheel`` (tools/gpu_bundle.sh).

Usage: python tools/pb1_detectron2.py DEST
"""

import hashlib
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/pypi/pb1-detectron2/json"
VERSION = "0.6"
EXTENSION = "ext_modules=get_extensions(),"
STALE_REQUIREMENTS = ('"future",', '"pydot",', '"black==21.4b2",')


def fetch(dest: Path) -> Path:
    """Download, verify and unpack the sdist into ``dest``; returns the patched source folder."""
    meta = json.load(urllib.request.urlopen(INDEX, timeout=60))
    sdist = next(u for u in meta["releases"][VERSION] if u["packagetype"] == "sdist")
    data = urllib.request.urlopen(sdist["url"], timeout=120).read()
    if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
        raise RuntimeError(f"{sdist['filename']}: sha256 mismatch")
    archive = dest / sdist["filename"]
    archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12 and recent 3.8-3.11 patch releases
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    src = dest / f"pb1-detectron2-{VERSION}"
    setup = src / "setup.py"
    text = setup.read_text()
    if EXTENSION not in text:
        raise RuntimeError("pb1-detectron2's setup.py changed; cannot disable its extension")
    text = text.replace(EXTENSION, "ext_modules=[],")
    for requirement in STALE_REQUIREMENTS:
        if requirement not in text:
            raise RuntimeError(f"pb1-detectron2's setup.py changed; no {requirement} to drop")
        text = text.replace(requirement, "")
    setup.write_text(text)
    return src


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    try:
        print(fetch(Path(sys.argv[1])))
    except Exception as e:  # noqa: BLE001 - one line for the calling script
        sys.exit(f"pb1-detectron2=={VERSION}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
