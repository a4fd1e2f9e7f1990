"""The quick benchmark runs and reports finite BKN / BN ratios."""

from __future__ import annotations

import math

import pytest
import torch

from kalmannorm.lab.bench import _saved_bytes, format_table, run_benchmark


@pytest.fixture(scope="module")
def quick_results() -> dict:
    # One thread: on a loaded machine more threads than free cores slow CPU kernels many-fold.
    threads = torch.get_num_threads()
    results = run_benchmark(quick=True, device="cpu", threads=1)
    assert torch.get_num_threads() == threads  # restored
    return results


def test_quick_benchmark_ratios(quick_results: dict) -> None:
    results = quick_results
    for key in ("layer_ratio", "step_ratio_eager"):
        assert isinstance(results[key], float)
        assert math.isfinite(results[key]) and results[key] > 0
    for key in ("layer_bn_ms", "layer_bkn_ms", "step_eager_bn_ms", "step_eager_bkn_ms"):
        assert math.isfinite(results[key]) and results[key] > 0
    assert results["layer_ratio"] == pytest.approx(results["layer_bkn_ms"] / results["layer_bn_ms"])
    assert results["step_ratio_compiled"] is None  # quick never compiles
    assert "skipped" in results["step_compiled"]["error"]
    config = results["config"]
    assert len(results["layer"]["bn_samples_ms"]) == config["layer_repeats"]
    assert len(results["step_eager"]["bkn_samples_ms"]) == config["step_repeats"]
    machine = results["machine"]
    assert machine["device"] == "cpu" and machine["cpu_count"] >= 1 and machine["torch"]
    assert machine["torch_threads"] == 1
    memory = results["memory"]
    assert memory["kind"] == "saved for backward" and memory["bn_bytes"] > 0
    assert results["memory_ratio"] == pytest.approx(memory["bkn_bytes"] / memory["bn_bytes"])
    for key in ("layer_wide_ratio", "folded_inference_ratio"):
        assert math.isfinite(results[key]) and results[key] > 0
    assert results["step_ratio_eager_resnet50"] is None  # quick skips the large model


def test_saved_bytes_counts_what_autograd_keeps():
    linear = torch.nn.Linear(64, 8, bias=False)
    x = torch.randn(32, 64, requires_grad=True)

    def step():
        linear(x).sum().backward()

    # Linear saves its input (32 x 64 floats) and its weight (8 x 64 floats).
    assert _saved_bytes(step) == (32 * 64 + 8 * 64) * 4


def test_format_table_has_ratio_rows(quick_results: dict) -> None:
    table = format_table(quick_results)
    lines = table.splitlines()
    assert lines[0].startswith("| measurement") and "BKN / BN" in lines[0]
    layer = next(line for line in lines if line.startswith("| layer fwd+bwd"))
    assert f"{quick_results['layer_ratio']:.2f}x" in layer
    eager = next(line for line in lines if "eager" in line and line.startswith("| train step"))
    assert f"{quick_results['step_ratio_eager']:.2f}x" in eager
    compiled = next(line for line in lines if "compiled" in line and line.startswith("| train"))
    assert "skipped" in compiled
    assert "saved for backward" in table and "folded inference" in table
    assert "| brn (" in table and "| cbn (conv+norm)" in table
    assert "torch " in table


def test_format_table_reports_compile_failure(quick_results: dict) -> None:
    results = dict(quick_results, step_compiled_resnet20={"error": "failed: RuntimeError: boom"})
    assert "failed: RuntimeError: boom" in format_table(results)


def test_format_table_reports_compile_time_with_the_cache_state(quick_results: dict) -> None:
    compiled = {
        "bn_ms": 2.0,
        "bkn_ms": 2.1,
        "ratio": 1.05,
        "compile_s": {"bn": 6.0, "bkn": 70.0},
        "compile_cache": {"bn": "26 hit/0 miss", "bkn": "3 hit/54 miss"},
        "graph_breaks": {"bn": 0, "bkn": 0},
    }
    table = format_table(dict(quick_results, step_compiled_resnet20=compiled))
    row = next(line for line in table.splitlines() if line.startswith("| train step, resnet20, c"))
    assert "1.05x" in row
    assert "bn 6 s (graph cache 26 hit/0 miss), bkn 70 s (graph cache 3 hit/54 miss)" in table
    assert "resnet20 graph breaks: bn 0, bkn 0" in table


def test_reproduce_report_takes_a_saved_benchmark(quick_results: dict, tmp_path) -> None:
    import json

    from kalmannorm.lab.reproduce import Budget, reproduce
    from kalmannorm.lab.train.compare import CompareConfig, Variant

    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(quick_results))
    empty = CompareConfig(  # a grid without finished runs: only the benchmark is reported
        train={"dataset": "digits"}, norms=[Variant("bn", "bn")], stat_batch_sizes=[2, 4]
    )
    empty.out = str(tmp_path / "runs")
    budget = Budget("bench-only", tmp_path, {"sweep": empty}, analysis_samples=None)
    report = reproduce(budget, out=tmp_path / "out", train=False, bench_json=saved, argv=[])
    text = report.read_text()
    assert format_table(quick_results) in text
    ratio = quick_results["step_ratio_eager"]
    assert f"ResNet-20 step on this CPU, eager: {ratio:.2f}x" in text
