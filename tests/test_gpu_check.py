"""tools/gpu_check.sh --dry-run: the GPU check's steps run on the CPU (or say why not) and leave
their summary and files, so the script the GPU node runs cannot rot. A one-module wheel stands in
for the bundle to check the offline install (pip --no-index --target)."""

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ["install", "ops", "memcheck", "op_bench", "models", "gpu_tests"]


def make_probe_wheel(folder: Path) -> Path:
    """A minimal valid wheel of a package ``d2i_probe``."""
    folder.mkdir(parents=True)
    files = {
        "d2i_probe/__init__.py": "VALUE = 42\n",
        "d2i_probe-0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: d2i-probe\n"
        "Version: 0.0\n",
        "d2i_probe-0.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append("d2i_probe-0.0.dist-info/RECORD,,")
    files["d2i_probe-0.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / "d2i_probe-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def summary_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[0] in STEPS:
            rows[cells[0]] = dict(status=cells[1], seconds=int(cells[2]), detail=cells[3])
    return rows


def test_gpu_check_dry_run(tmp_path):
    make_probe_wheel(tmp_path / "bundle")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), D2INV_PYTHON=sys.executable)
    cmd = ["bash", "tools/gpu_check.sh", "--dry-run", "--bundle", str(tmp_path / "bundle")]
    proc = subprocess.run(
        cmd + ["--budget", "420"], cwd=REPO, env=env, capture_output=True, text=True, timeout=480
    )
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run)"), summary
    rows = summary_rows(summary)
    assert list(rows) == STEPS, summary
    assert all(r["status"] == "passed" for s, r in rows.items() if s != "memcheck"), summary
    assert "d2i_probe-0.0" in rows["install"]["detail"]
    assert rows["memcheck"] == dict(status="skipped", seconds=0, detail="dry run: needs a GPU")
    for step in ("ops", "gpu_tests"):  # the GPU test selections, collected
        collected = re.match(r"(\d+)/\d+ tests collected", rows[step]["detail"])
        assert collected and int(collected.group(1)) > 0, rows[step]
    assert rows["op_bench"]["detail"] == "2 table rows"
    assert rows["models"]["detail"] == "4 rows in benchmark_models.md, 0 with an error note"
    models = (out / "benchmark_models.md").read_text()
    for name in ("rednet50_cls", "resnet50_cls", "faster_rcnn_rednet50_fpn", "faster_rcnn_R50_fpn"):
        assert f"| {name} |" in models
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "summary.md" in files, files
    print(f"gpu_check dry run: {sum(r['seconds'] for r in rows.values())} s in steps", summary)
