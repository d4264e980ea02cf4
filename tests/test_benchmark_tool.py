"""tools/benchmark.py: the classifier part runs end to end on CPU and reports one table.

No timing is asserted (speed claims belong in docs/benchmarks.md); the test checks that every
requested configuration is measured and written as markdown and JSON.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("d2inv_benchmark", REPO / "tools" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_classifier_benchmark_table_and_json(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "bench"
    argv = "--device cpu --models rednet50_cls,resnet50_cls --amp none --batch 2 --iters 1 "
    argv += f"--warmup 0 --image-size 32 --output {out}"
    table = benchmark.main(argv.split())

    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    assert titles == [title for _, title in benchmark.COLUMNS]
    rows = [line for line in lines if line.startswith("| re")]
    assert [row.split("|")[1].strip() for row in rows] == ["rednet50_cls", "resnet50_cls"]
    assert "- device: `CPU" in table and "--models rednet50_cls,resnet50_cls" in table
    assert (out.with_suffix(".md")).read_text() == table

    data = json.loads(out.with_suffix(".json").read_text())
    results = {r["model"]: r for r in data["results"]}
    assert set(results) == {"rednet50_cls", "resnet50_cls"}
    # Official RedNet-50 / torchvision ResNet-50 parameter counts: the intended models were built.
    assert results["rednet50_cls"]["params_m"] * 1e6 == pytest.approx(15_540_806, abs=1)
    assert results["resnet50_cls"]["params_m"] * 1e6 == pytest.approx(25_557_032, abs=1)
    for r in results.values():
        assert r["note"] == "" and (r["amp"], r["layout"], r["batch"]) == ("none", "contiguous", 2)
        assert r["input"] == "32x32"
        for key in ("train_ips", "infer_b1_ms", "infer_ips"):
            assert r[key] > 0, key


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="models must be among"):
        benchmark.run(
            ["resnet18"], torch.device("cpu"), ["none"], [False], 1, 1, 32, (64, 64), 0, 1
        )
    with pytest.raises(ValueError, match="amp modes"):
        benchmark.run(
            ["resnet50_cls"], torch.device("cpu"), ["fp8"], [False], 1, 1, 32, (64, 64), 0, 1
        )


def test_rounds_are_combined_per_configuration():
    def result(model, ips, peak, note=""):
        return benchmark.Result(
            model, "none", "contiguous", 2, "32x32", 1.0, ips, peak, 2 * ips, 3 * ips, peak, note
        )

    rounds = [
        result("a", 1.0, 10),
        result("b", 5.0, 1),
        result("a", 3.0, 30, "slow"),
        result("b", 7.0, 2),
        result("a", 2.0, 20),
    ]
    a, b = benchmark.combine_rounds(rounds)
    assert (a.model, a.train_ips, a.infer_b1_ms, a.train_peak_mib) == ("a", 2.0, 4.0, 30)
    assert a.note == "median of 3 rounds; slow"
    assert (b.model, b.train_ips, b.infer_ips, b.note) == ("b", 6.0, 18.0, "median of 2 rounds")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        benchmark.run(
            ["resnet50_cls"],
            torch.device("cpu"),
            ["none"],
            [False],
            1,
            1,
            32,
            (64, 64),
            0,
            1,
            rounds=0,
        )
