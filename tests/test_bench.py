"""The quick benchmark runs and reports finite BKN / BN ratios."""

from __future__ import annotations

import json
import math
import mmap
import sys

import pytest
import torch

from kalmannorm._torch_private import OBSERVING_MODE
from kalmannorm.lab import bench_micro
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


# -- ATen calls and host syncs beside the step times (issue 17) --------------------------------


def _logged_ops(fn) -> list[str]:
    """torch's own op logger (an independent dispatch mode): one line per ATen call."""
    import logging

    logging_tensor = pytest.importorskip("torch.testing._internal.logging_tensor")
    logger = logging.getLogger("LoggingTensor")
    propagate, logger.propagate = logger.propagate, False  # pytest's handler would print
    mode = logging_tensor.LoggingTensorMode()
    # it runs each operation as called, as the counter does: both see the step's own calls
    setattr(mode, OBSERVING_MODE, True)
    try:  # the logged tensors inside the mode, dispatching more operations
        with logging_tensor.capture_logs(is_mode=True) as logs, mode:
            fn()
    finally:
        logger.propagate = propagate
    return list(logs)


def _small_workload(norm: str | None, sync_in_forward: bool = False):
    from kalmannorm import convert_norm
    from kalmannorm.lab.bench_micro import Workload

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(8),
                torch.nn.ReLU(),
                torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(8),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
                torch.nn.Linear(8, 10),
            )

        def forward(self, x):
            if sync_in_forward:
                assert bool(x.abs().sum() >= 0)  # one device-to-host read
            return self.body(x)

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    model = Net()
    if norm is not None:
        model = convert_norm(model, norm, stat_batch_size=2, example_input=x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    workload = Workload(model, optimizer, model, x, y)
    workload.step()
    return workload


@pytest.mark.parametrize("norm", [None, "bkn", "bkn-flow"])
def test_step_counts_match_torchs_op_logger(norm) -> None:
    from kalmannorm.lab.bench_micro import step_counts

    workload = _small_workload(norm)
    counts = step_counts(workload)
    forward_backward = _logged_ops(workload.forward_backward)
    optimizer_step = _logged_ops(workload.optimizer.step)
    assert counts["aten_calls"] == len(forward_backward)
    assert counts["step_aten_calls"] == len(forward_backward) + len(optimizer_step)
    reads = [op for op in forward_backward + optimizer_step if "_local_scalar_dense" in op]
    assert counts["host_sync_ops"].get("_local_scalar_dense", 0) == len(reads)
    assert counts["host_syncs_per_step"] == sum(counts["host_sync_ops"].values())
    if norm is None:
        assert counts["host_syncs_per_step"] == 0  # torch's BatchNorm reads nothing back


def test_kernel_calls_see_inside_compiled_small_steps() -> None:
    from kalmannorm import compile_kalman_steps
    from kalmannorm.lab.bench_micro import (
        _inductor_kernels_named,
        kernel_call_kinds,
        kernel_calls,
        step_counts,
    )

    eager = _small_workload("bkn-flow")
    compiled = _small_workload("bkn-flow")
    compile_kalman_steps(compiled.model)
    with _inductor_kernels_named():
        compiled.step()  # compiles
    eager_calls, compiled_calls = kernel_calls(eager), kernel_calls(compiled)
    assert compiled_calls < eager_calls
    kinds = kernel_call_kinds(compiled)  # the same calls by name: inductor's among them
    assert kinds["fused"] > 0 and kinds.total() == compiled_calls
    # the dispatch-mode count runs the compiled steps as written: it cannot see the difference
    assert step_counts(compiled)["aten_calls"] == step_counts(eager)["aten_calls"]
    # and the same forward, profiled, shows the generated kernels themselves
    from torch.profiler import profile

    with profile() as trace:
        compiled.forward_backward()
    assert any("cpp_fused" in e.name for e in trace.events())


def test_step_counts_see_a_host_read() -> None:
    from kalmannorm.lab.bench_micro import step_counts

    plain, syncing = _small_workload(None), _small_workload(None, sync_in_forward=True)
    assert step_counts(plain)["host_syncs_per_step"] == 0
    counts = step_counts(syncing)
    assert counts["host_syncs_per_step"] == 1
    assert counts["host_sync_ops"] == {"_local_scalar_dense": 1}


def test_quick_benchmark_counts_beside_the_times(quick_results: dict) -> None:
    pytest.importorskip("torchvision")  # the micro rows build torchvision models
    micro = quick_results["micro"]
    config = micro["config"]
    rows = micro["rows"]
    expected = {(m, b) for m, _ in config["models"] for b in config["batches"]}
    assert {(r["model"], r["batch"]) for r in rows} == expected
    assert {r["norm"] for r in rows} == {"second-bn", "bkn", "bkn-flow"}
    assert all(r["mode"] == "eager" for r in rows)  # quick never compiles
    for row in rows:
        assert "error" not in row, row
        for key in ("aten_calls", "bn_aten_calls", "host_syncs_per_step", "step_aten_calls"):
            assert isinstance(row[key], int) and row[key] >= 0, (key, row)
        assert row["aten_calls"] > 0 and row["step_aten_calls"] > row["aten_calls"]
        assert 0 < row["kernel_calls"] <= row["aten_calls"]  # the profiler's top-level calls
        assert row["kernel_calls_ratio"] == row["kernel_calls"] / row["bn_kernel_calls"]
        assert row["aten_calls_ratio"] == row["aten_calls"] / row["bn_aten_calls"]
        assert row["bn_host_syncs_per_step"] == 0
        assert row["host_syncs_per_step"] == sum(row["host_sync_ops"].values())
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["bn_ms"] > 0
        if sys.platform != "win32":  # (the count itself: the test below)
            assert {"page_faults_per_step", "bn_page_faults_per_step"} <= row.keys()
        if row["norm"] == "second-bn":  # a second BatchNorm model: the same operations
            assert row["aten_calls_ratio"] == 1.0 and row["host_syncs_per_step"] == 0
        else:
            assert row["aten_calls_ratio"] > 1.0
    # the headline (first model, batch 4, bkn) at the top level, the maxima over all rows
    head = next(r for r in rows if r["norm"] == "bkn")
    assert micro["headline"]["model"] == head["model"]
    assert quick_results["aten_calls_ratio"] == head["aten_calls_ratio"]
    assert quick_results["host_syncs_per_step"] == head["host_syncs_per_step"]
    kalman = [r for r in rows if r["norm"] != "second-bn"]
    kalman.append(quick_results["step_eager_resnet20"])
    assert quick_results["aten_calls_ratio_max"] == max(r["aten_calls_ratio"] for r in kalman)
    assert quick_results["host_syncs_per_step_max"] == max(r["host_syncs_per_step"] for r in kalman)
    # the classic step rows carry them too
    step = quick_results["step_eager_resnet20"]
    assert step["aten_calls_ratio"] == step["bkn_aten_calls"] / step["bn_aten_calls"] > 1
    assert step["bn_host_syncs_per_step"] == 0
    saved = json.loads(json.dumps(quick_results))  # what --json writes
    assert saved["micro"]["rows"] == rows and saved["aten_calls_ratio"] > 1


def test_format_table_has_the_micro_rows(quick_results: dict) -> None:
    pytest.importorskip("torchvision")  # the micro rows build torchvision models
    table = format_table(quick_results)
    assert "| model (px) | batch | mode | norm |" in table
    row = next(r for r in quick_results["micro"]["rows"] if r["norm"] == "bkn")
    start = f"| {row['model']} ({row['image_size']}) | {row['batch']} | eager | bkn |"
    line = next(line for line in table.splitlines() if line.startswith(start))
    assert f"{row['aten_calls_ratio']:.2f}x" in line and f"{row['ratio']:.2f}x" in line
    assert f"| {row['host_syncs_per_step']} (0) |" in line


def test_bench_sections_and_the_cli_choices() -> None:
    from kalmannorm.lab.bench import SECTIONS
    from kalmannorm.lab.cli import build_parser

    parser = build_parser()
    bench = parser.parse_args(["bench", "--only", *SECTIONS])
    assert tuple(bench.only) == SECTIONS
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "nothing"])
    with pytest.raises(ValueError, match="unknown bench sections"):
        run_benchmark(quick=True, sections=("layers",))


def test_micro_rows_report_a_failing_norm(monkeypatch) -> None:
    pytest.importorskip("torchvision")  # the micro rows build torchvision models
    from kalmannorm.lab import bench_micro

    config = bench_micro.MicroConfig(
        models=(("mobilenet_v2", 16),), batches=(2,), large_batch=None, norms=("bkn",),
        warmup=0, repeats=1, iters=1, compile_batches=(),
    )  # fmt: skip
    real = bench_micro.convert_norm

    def failing(model, name, **options):
        if name == "bkn":
            raise RuntimeError("no such luck")
        return real(model, name, **options)

    monkeypatch.setattr(bench_micro, "convert_norm", failing)
    section = bench_micro.micro_rows(config=config)
    rows = {r["norm"]: r for r in section["rows"]}
    assert rows["bkn"]["error"] == "RuntimeError: no such luck"
    assert rows["second-bn"]["aten_calls_ratio"] == 1.0
    assert "RuntimeError: no such luck" in bench_micro.format_micro_table(section)


def test_micro_rows_measure_baselines_beside_the_kalman_norms() -> None:
    pytest.importorskip("torchvision")  # the micro rows build torchvision models
    from kalmannorm.lab import bench_micro
    from kalmannorm.layers.ghost_batch import GhostBatchNorm

    config = bench_micro.MicroConfig(
        models=(("mobilenet_v2", 16),), batches=(4,), large_batch=None, norms=("bn", "gn"),
        warmup=0, repeats=1, iters=1, compile_batches=(),
    )  # fmt: skip
    rows = {r["norm"]: r for r in bench_micro.micro_rows(config=config)["rows"]}
    assert set(rows) == {"second-bn", "bn", "gn"}
    assert all("error" not in r for r in rows.values()), rows
    # ghost BN in groups of 2 (its own layers, more calls than torch's one kernel per layer);
    # GroupNorm, whose statistics are per sample, built without a statistics batch
    x = torch.randn(4, 3, 16, 16)
    ghost = bench_micro._build("mobilenet_v2", "bn", x, 2, torch.device("cpu"))
    layers = [m for m in ghost.modules() if isinstance(m, GhostBatchNorm)]
    assert layers and all(m.stat_batch_size == 2 for m in layers)
    assert rows["bn"]["aten_calls_ratio"] > 1.0 and rows["gn"]["aten_calls"] > 0


def test_micro_rows_skip_without_torchvision(monkeypatch) -> None:
    import sys

    from kalmannorm.lab import bench_micro

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    section = bench_micro.micro_rows(quick=True)
    assert section["rows"] == [] and section["skipped"] == "torchvision is not installed"
    assert "skipped: torchvision is not installed" in bench_micro.format_micro_table(section)


def test_residual_report_reads_the_micro_rows(quick_results: dict) -> None:
    import statistics

    from kalmannorm.lab.reproduce.runner import residual_step_time

    pytest.importorskip("torchvision")  # the micro rows build torchvision models
    flow = [r["ratio"] for r in quick_results["micro"]["rows"] if r["norm"] == "bkn-flow"]
    ratios = residual_step_time(quick_results)
    assert ratios["bn"] == 1.0 and statistics.median(flow) in ratios.values()


def test_micro_command_line_chooses_models_batches_and_norms() -> None:
    import argparse

    from kalmannorm.lab.bench_micro import FULL_MICRO, _chosen_config

    args = argparse.Namespace(models="resnet50:64,mobilenet_v2:32", batches="2,4", norms="bkn")
    config = _chosen_config(FULL_MICRO, args)
    assert config.models == (("resnet50", 64), ("mobilenet_v2", 32))
    assert config.batches == (2, 4) and config.large_batch is None and config.norms == ("bkn",)
    assert config.compiled_steps == FULL_MICRO.compiled_steps  # the rest as the full run's
    with pytest.raises(SystemExit, match="MODEL:PIXELS with MODEL one of resnet50"):
        _chosen_config(FULL_MICRO, argparse.Namespace(models="vgg:64", batches=None, norms=None))
    with pytest.raises(SystemExit, match=r"--norms takes registered norms \(bkn, .*got 'bkm'"):
        _chosen_config(FULL_MICRO, argparse.Namespace(models=None, batches=None, norms="bn,bkm"))


def _touch_fresh_pages(pages: int) -> None:
    fresh = mmap.mmap(-1, pages * 4096)  # anonymous: no page mapped until written
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KiB pages even where huge pages are the default
        fresh.madvise(mmap.MADV_NOHUGEPAGE)
    for page in range(pages):
        fresh[page * 4096] = 1
    fresh.close()


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no getrusage page faults")
def test_timed_rounds_count_the_page_faults_of_each_call() -> None:
    """The bench's page-fault count per call: about one per 4 KiB page of new memory a call
    writes (4,096 for one, none for the other), through ``timed_rounds``."""
    faults: dict[str, list[float]] = {}
    calls = {"fresh": lambda: _touch_fresh_pages(4096), "none": lambda: None}
    bench_micro.timed_rounds(calls, warmup=1, repeats=2, iters=2, sync=lambda: None, faults=faults)
    assert all(2048 <= f <= 8192 for f in faults["fresh"]), faults
    assert all(f < 256 for f in faults["none"]), faults


def test_micro_rows_give_the_median_and_the_range_of_the_per_round_ratios() -> None:
    from kalmannorm.lab import bench_micro

    config = bench_micro.MicroConfig(norms=(), compiled_steps=())
    # three rounds: BN 10, 20, 40 ms; the second BN model 11, 18, 44 ms (ratios 1.1, 0.9, 1.1)
    samples = {"torch_bn": [10.0, 20.0, 40.0], bench_micro.SECOND_BN: [11.0, 18.0, 44.0]}
    (row,) = bench_micro._rows("resnet50", 64, 4, config, "eager", samples, {}, {})
    assert row["bn_ms"] == 20.0 and row["ms"] == 18.0  # medians of the times
    assert row["ratio"] == pytest.approx(1.1)  # the median of the per-round ratios, not 18 / 20
    assert row["ratio_range"] == pytest.approx([0.9, 1.1])
    section = {"rows": [row], "config": {"stat_batch_size": 2}, "total_s": 1.0}
    table = bench_micro.format_micro_table(section)
    assert "| 1.10x (0.90-1.10) |" in table
