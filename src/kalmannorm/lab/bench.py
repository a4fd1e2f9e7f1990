"""How much slower is Batch Kalman Normalization than BatchNorm? Measured on this machine.

Each measurement compares BKN (statistics-batch ``stat_batch_size``, linked in a chain so the
Kalman prior path runs) against :class:`torch.nn.BatchNorm2d` in the same process:

``layer`` (and ``layer_wide``)
    forward + backward of ``Sequential(BatchNorm2d(C), BatchNorm2d(C))`` and of its converted
    version (the second BKN layer takes the first one's posterior as its prior) on a fixed
    (N, C, H, W) input that requires grad: N=128, C=64, 32x32 and N=32, C=256, 14x14.
``step``
    one full training step (forward, cross-entropy, backward, SGD step) of
    :func:`~kalmannorm.lab.models.preact_resnet20` (batch 128, 32x32) and of torchvision's ResNet-50
    (batch 8, 224x224; when torchvision is installed), BN at the whole batch vs BKN with
    statistics-batch ``stat_batch_size``, eager and under :func:`torch.compile` (a compile failure
    is reported, not raised).
``memory``
    activation memory of a ResNet-20 training step: peak allocated bytes on CUDA; on CPU the bytes
    autograd saves for the backward pass (what grows with the batch).
``folded``
    inference of :func:`kalmannorm.fold` of each trained-mode model (eval, batch 128).
``norms``
    one row per registered norm: forward + backward of two such layers relative to native
    BatchNorm (:mod:`kalmannorm.lab.bench_norms`).
``micro``
    training steps at batch 2, 4 and 8 (and 128) of ResNet-50, MobileNetV2 and a ResNet-50 FPN
    detection backbone, BN vs ``bkn`` and ``bkn-flow``, eager and compiled
    (:mod:`kalmannorm.lab.bench_micro`).

Beside each eager step-time ratio: ``aten_calls_ratio``, the ATen operations dispatched in one
forward + backward (counted with a ``TorchDispatchMode``), BKN / BN, and
``host_syncs_per_step``, BKN's device-to-host reads in one forward + backward + optimizer step
(:mod:`kalmannorm._dispatch_count`). Counts do not depend on the machine.

Timing: warm-up iterations first (not timed; they include compilation), then ``repeats`` rounds
that each time ``iters`` calls of BN and of BKN back to back, alternating which goes first, so
slow drift and background load hit both; a measurement is the median over rounds of the mean time
per call. Ratios are BKN time / BN time (> 1: BKN is slower).

Run ``python -m kalmannorm.lab.bench`` (``--quick`` for a smoke run of a minute or two,
``--only micro`` for one section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_f

from kalmannorm.convert import convert_norm
from kalmannorm.fold import fold
from kalmannorm.lab.bench_micro import (
    SECOND_BN,
    MicroConfig,
    Workload,
    format_micro_table,
    micro_rows,
    step_counts,
    synchronizer,
    timed_rounds,
)
from kalmannorm.lab.models import preact_resnet20

__all__ = ["SECTIONS", "BenchConfig", "format_table", "main", "run_benchmark"]

#: The parts of a run: layers and steps ("classic": layer, step, memory, folded), per-norm rows,
#: micro-batch steps.
SECTIONS = ("classic", "norms", "micro")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeat counts of one benchmark run."""

    layer_batch: int = 128
    layer_channels: int = 64
    layer_size: int = 32
    wide_batch: int = 32
    wide_channels: int = 256
    wide_size: int = 14
    step_batch: int = 128
    step_size: int = 32
    stat_batch_size: int = 2
    layer_warmup: int = 3
    layer_repeats: int = 7
    layer_iters: int = 5
    step_warmup: int = 2
    step_repeats: int = 5
    step_iters: int = 2
    compile_warmup: int = 2
    compile_repeats: int = 3
    compile_iters: int = 1
    large_model: bool = True
    large_batch: int = 8
    large_size: int = 224


FULL = BenchConfig()
QUICK = BenchConfig(
    layer_batch=32,
    layer_channels=16,
    layer_size=16,
    step_batch=16,
    step_size=16,
    layer_warmup=2,
    layer_repeats=3,
    layer_iters=3,
    step_warmup=1,
    step_repeats=3,
    step_iters=1,
    wide_batch=8,
    wide_channels=32,
    wide_size=7,
    large_model=False,
)


# -- timing -----------------------------------------------------------------------------------


def _summary(samples: dict[str, list[float]]) -> dict:
    bn, bkn = statistics.median(samples["bn"]), statistics.median(samples["bkn"])
    return {
        "bn_ms": bn,
        "bkn_ms": bkn,
        "ratio": bkn / bn,
        "bn_samples_ms": samples["bn"],
        "bkn_samples_ms": samples["bkn"],
    }


def _peak_memory(device: torch.device, call: Callable[[], None]) -> int | None:
    """Peak allocated bytes of one call (CUDA only; ``None`` elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:160]


# -- the two measurements ---------------------------------------------------------------------


def _layer_calls(
    shape: tuple[int, int, int, int], stat_batch_size: int, device: torch.device
) -> dict[str, Callable[[], None]]:
    c = shape[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device).requires_grad_(True)
    grad = torch.randn(shape, generator=generator).to(device)
    bn = nn.Sequential(nn.BatchNorm2d(c), nn.BatchNorm2d(c)).to(device).train()
    bkn = convert_norm(
        nn.Sequential(nn.BatchNorm2d(c), nn.BatchNorm2d(c)).to(device).train(),
        "bkn",
        stat_batch_size=stat_batch_size,
    )

    def make(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(x).backward(grad)

        return call

    return {"bn": make(bn), "bkn": make(bkn)}


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


#: Training-step workloads: name -> (model builder, batch and image-size config fields).
WORKLOADS: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "resnet20": (preact_resnet20, "step_batch", "step_size"),
    "resnet50": (_resnet50, "large_batch", "large_size"),
}


def _step_models(
    config: BenchConfig, device: torch.device, workload: str = "resnet20"
) -> dict[str, nn.Module]:
    build = WORKLOADS[workload][0]
    torch.manual_seed(0)
    bn = build().to(device).train()
    torch.manual_seed(0)
    bkn = convert_norm(build().to(device).train(), "bkn", stat_batch_size=config.stat_batch_size)
    return {"bn": bn, "bkn": bkn}


def _step_call(
    model: nn.Module, run: Callable[[Tensor], Tensor], x: Tensor, y: Tensor
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch_f.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()

    return call


def _step_counts(models: dict[str, nn.Module], x: Tensor, y: Tensor) -> dict:
    """ATen calls (forward + backward) and host syncs (whole step) of BN and BKN, and the ratio."""
    counts = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        workload = Workload(model, optimizer, model, x, y)
        workload.step()  # its momentum buffers exist
        counts[name] = step_counts(workload)
    bn, bkn = counts["bn"], counts["bkn"]
    return {
        "bn_aten_calls": bn["aten_calls"],
        "bkn_aten_calls": bkn["aten_calls"],
        "aten_calls_ratio": bkn["aten_calls"] / bn["aten_calls"],
        "bn_host_syncs_per_step": bn["host_syncs_per_step"],
        "host_syncs_per_step": bkn["host_syncs_per_step"],
        "host_sync_ops": bkn["host_sync_ops"],
    }


def _step_data(
    config: BenchConfig, device: torch.device, workload: str = "resnet20"
) -> tuple[Tensor, Tensor]:
    _, batch_field, size_field = WORKLOADS[workload]
    batch, size = getattr(config, batch_field), getattr(config, size_field)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return x, y


def _saved_bytes(call: Callable[[], None]) -> int:
    """Bytes of the tensors autograd saves for backward during one call (each storage once)."""
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    return sum(seen.values())


def _folded_calls(models: dict[str, nn.Module], x: Tensor) -> dict[str, Callable[[], None]]:
    folded = {name: fold(model) for name, model in models.items()}

    def make(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                model(x)

        return call

    return {name: make(model) for name, model in folded.items()}


def _graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # pragma: no cover - private API
        return None


def _compile_cache() -> str | None:
    """Inductor's compiled-graph cache hits/misses since the counters were cleared: a compile time
    taken from a warm cache (an earlier run compiled the same graphs) is not a compile time."""
    try:
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return f"{inductor['fxgraph_cache_hit']} hit/{inductor['fxgraph_cache_miss']} miss"
    except Exception:  # pragma: no cover - private API
        return None


def _compiled_step(
    config: BenchConfig, device: torch.device, sync: Callable[[], None], workload: str
) -> dict:
    """Compile both models, warm up (compilation time reported), then time interleaved."""
    import torch._dynamo

    x, y = _step_data(config, device, workload)
    calls: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    graph_breaks: dict[str, int | None] = {}
    cache: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for name, model in _step_models(config, device, workload).items():
        torch._dynamo.reset()
        try:
            from torch._dynamo.utils import counters

            counters.clear()
        except Exception:  # pragma: no cover - private API
            pass
        try:
            call = _step_call(model, torch.compile(model), x, y)
            start = time.perf_counter()
            for _ in range(config.compile_warmup):
                call()
            sync()
            compile_s[name] = time.perf_counter() - start
            graph_breaks[name] = _graph_breaks()
            cache[name] = _compile_cache()
            calls[name] = call
        except Exception as error:  # any compile failure is a result
            errors[name] = _short_error(error)
    if errors:
        reason = "; ".join(f"{name}: {message}" for name, message in errors.items())
        return {"error": f"failed: {reason}", "compile_s": compile_s}
    try:
        samples = timed_rounds(calls, 0, config.compile_repeats, config.compile_iters, sync)
    except Exception as error:
        return {"error": f"failed: {_short_error(error)}", "compile_s": compile_s}
    return {
        **_summary(samples),
        "compile_s": compile_s,
        "compile_cache": cache,
        "graph_breaks": graph_breaks,
    }


# -- the benchmark ----------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    """What the timings were taken on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info


def run_benchmark(
    quick: bool = False,
    compile: bool = True,
    device: str | torch.device = "cpu",
    config: BenchConfig | None = None,
    threads: int | None = None,
    sections: tuple[str, ...] = SECTIONS,
    micro_config: MicroConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time BKN against BatchNorm2d on this machine; see the module docstring.

    Args:
        quick: small sizes and few repeats (well under a minute on two CPU cores); never compiles.
        compile: also time the training step under :func:`torch.compile` (ignored when quick).
        device: where to run ("cpu", "cuda", ...).
        config: explicit sizes and repeat counts (overrides ``quick``'s choice).
        threads: CPU threads for the run (:func:`torch.set_num_threads`, restored afterwards);
            ``None`` keeps the current setting. On a loaded machine one thread gives far steadier
            timings than more threads than free cores.
        sections: which of :data:`SECTIONS` to run.
        micro_config: a :class:`kalmannorm.lab.bench_micro.MicroConfig` for the micro section
            (default: quick's or the full one).
        progress: called with one line before each part.

    Returns:
        A dict with ``layer_ratio``, ``step_ratio_eager`` and ``step_ratio_compiled`` (BKN time /
        BN time; the last ``None`` when skipped or failed, with the reason in
        ``step_compiled["error"]``), the raw timings in ms under ``layer``, ``step_eager`` and
        ``step_compiled``, ``memory`` (peak-memory ratio of a training step, CUDA only),
        ``config`` and ``machine``; the eager step entries also carry ``aten_calls_ratio`` and
        ``host_syncs_per_step``; ``micro`` (:func:`kalmannorm.lab.bench_micro.micro_rows`) and,
        from its headline row (ResNet-50 at batch 4, ``bkn``; quick: the first model's),
        ``aten_calls_ratio`` and ``host_syncs_per_step`` at the top level, with their maxima over
        every eager step row of the run (``aten_calls_ratio_max``, ``host_syncs_per_step_max``).
        A section not run leaves its keys ``None`` or absent.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench sections {sorted(unknown)}; choose from {SECTIONS}")
    device = torch.device(device)
    config = config or (QUICK if quick else FULL)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(config, quick, compile and not quick, device, sections, micro_config, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    config: BenchConfig,
    quick: bool,
    do_compile: bool,
    device: torch.device,
    sections: tuple[str, ...],
    micro_config: MicroConfig | None,
    progress: Callable[[str], None] | None,
) -> dict:
    sync = synchronizer(device)
    started = time.perf_counter()
    results: dict = {
        "machine": machine_info(device),
        "config": asdict(config),
        "quick": quick,
        "sections": list(sections),
    }
    say = progress or (lambda line: None)
    if "classic" in sections:
        say("layers and steps")
        _run_classic(results, config, quick, do_compile, device, sync)
    if "norms" in sections:
        from kalmannorm.lab.bench_norms import norm_layer_rows

        say("one row per norm")
        results["norms"] = norm_layer_rows(quick, str(device))
    if "micro" in sections:
        results["micro"] = micro_rows(
            quick, device, config=micro_config, compile=do_compile, progress=progress
        )
    results.update(_summary_keys(results))
    results["total_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_end"] = list(os.getloadavg())
    return results


def _run_classic(
    results: dict,
    config: BenchConfig,
    quick: bool,
    do_compile: bool,
    device: torch.device,
    sync: Callable[[], None],
) -> None:
    def time_pair(calls: dict[str, Callable[[], None]], warmup: int, repeats: int, iters: int):
        return _summary(timed_rounds(calls, warmup, repeats, iters, sync))

    layer_args = (config.layer_warmup, config.layer_repeats, config.layer_iters)
    shapes = {
        "layer": (config.layer_batch, config.layer_channels, config.layer_size, config.layer_size),
        "layer_wide": (config.wide_batch, config.wide_channels, config.wide_size, config.wide_size),
    }
    for key, shape in shapes.items():
        results[key] = time_pair(_layer_calls(shape, config.stat_batch_size, device), *layer_args)

    step_args = (config.step_warmup, config.step_repeats, config.step_iters)
    workloads = ["resnet20"] + (["resnet50"] if config.large_model and _has_torchvision() else [])
    for workload in workloads:
        x, y = _step_data(config, device, workload)
        models = _step_models(config, device, workload)
        calls = {name: _step_call(model, model, x, y) for name, model in models.items()}
        results[f"step_eager_{workload}"] = {
            **time_pair(calls, *step_args),
            **_step_counts(models, x, y),
        }
        if workload == "resnet20":
            results["memory"] = _memory(device, calls)
            eval_x = x[: config.step_batch]
            results["folded"] = time_pair(_folded_calls(models, eval_x), *layer_args)
        del models, calls
        if do_compile:
            results[f"step_compiled_{workload}"] = _compiled_step(config, device, sync, workload)
        else:
            reason = "skipped (quick run)" if quick else "skipped (compile=False)"
            results[f"step_compiled_{workload}"] = {"error": reason}


def _summary_keys(results: dict) -> dict:
    """The top-level figures (``None`` where their section did not run)."""
    eager20 = results.get("step_eager_resnet20", {})
    compiled20 = results.get("step_compiled_resnet20", {})
    keys = dict(
        step_eager=eager20 or None,
        step_compiled=compiled20 or None,
        layer_ratio=results.get("layer", {}).get("ratio"),
        layer_wide_ratio=results.get("layer_wide", {}).get("ratio"),
        step_ratio_eager=eager20.get("ratio"),
        step_ratio_compiled=compiled20.get("ratio"),
        step_ratio_eager_resnet50=results.get("step_eager_resnet50", {}).get("ratio"),
        step_ratio_compiled_resnet50=results.get("step_compiled_resnet50", {}).get("ratio"),
        memory_ratio=results.get("memory", {}).get("ratio"),
        folded_inference_ratio=results.get("folded", {}).get("ratio"),
        layer_bn_ms=results.get("layer", {}).get("bn_ms"),
        layer_bkn_ms=results.get("layer", {}).get("bkn_ms"),
        step_eager_bn_ms=eager20.get("bn_ms"),
        step_eager_bkn_ms=eager20.get("bkn_ms"),
        step_compiled_bn_ms=compiled20.get("bn_ms"),
        step_compiled_bkn_ms=compiled20.get("bkn_ms"),
    )
    # calls ratio and syncs: the micro headline row (else ResNet-20's step), maxima over all rows
    counted = [results[k] for k in ("step_eager_resnet20", "step_eager_resnet50") if k in results]
    micro = results.get("micro", {})
    counted += [
        r for r in micro.get("rows", []) if "aten_calls_ratio" in r and r["norm"] != SECOND_BN
    ]
    head = micro.get("headline", {}).get("bkn") or eager20
    keys.update(
        aten_calls_ratio=head.get("aten_calls_ratio"),
        host_syncs_per_step=head.get("host_syncs_per_step"),
        aten_calls_ratio_max=max((r["aten_calls_ratio"] for r in counted), default=None),
        host_syncs_per_step_max=max((r["host_syncs_per_step"] for r in counted), default=None),
    )
    return keys


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def _memory(device: torch.device, calls: dict[str, Callable[[], None]]) -> dict:
    """Peak allocated bytes on CUDA; bytes saved for backward elsewhere."""
    if device.type == "cuda":
        peaks = {name: _peak_memory(device, call) for name, call in calls.items()}
        kind = "peak allocated"
    else:
        peaks = {name: _saved_bytes(call) for name, call in calls.items()}
        kind = "saved for backward"
    return {
        "bn_bytes": peaks["bn"],
        "bkn_bytes": peaks["bkn"],
        "ratio": peaks["bkn"] / peaks["bn"],
        "kind": kind,
    }


# -- reporting --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(results: dict) -> str:
    """A Markdown table of the timings and ratios of :func:`run_benchmark`'s result."""
    parts = []
    if "layer" in results:
        parts.append(_classic_table(results))
    norm_rows = [
        f"| {row['norm']} ({row['setup']}) | {row['ms']:.2f} | {row['ratio_to_bn']:.2f}x |"
        for row in results.get("norms", [])
    ]
    if norm_rows:
        header = ["| norm, fwd+bwd of two layers | ms | / native BN |", "|---|---:|---:|"]
        parts.append("\n".join(header + norm_rows))
    if "micro" in results:
        parts.append(format_micro_table(results["micro"]))
    return "\n\n".join(parts) + "\n\n" + "; ".join(_notes(results))


def _classic_table(results: dict) -> str:
    config = results["config"]
    s = config["stat_batch_size"]
    layer_shape = (
        f"N={config['layer_batch']} C={config['layer_channels']} "
        f"{config['layer_size']}x{config['layer_size']}"
    )
    step_shape = f"batch {config['step_batch']}, {config['step_size']}x{config['step_size']}"
    rows = [
        "| measurement | BatchNorm2d (ms) | BKN (ms) | BKN / BN | ATen calls / BN "
        "| host syncs / step (BN) |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, entry: dict) -> str:
        if "error" in entry:
            return f"| {label} | - | - | {entry['error']} | - | - |"
        calls = syncs = "-"
        if "aten_calls_ratio" in entry:
            calls = f"{entry['aten_calls_ratio']:.2f}x"
            syncs = f"{entry['host_syncs_per_step']} ({entry['bn_host_syncs_per_step']})"
        return (
            f"| {label} | {_ms(entry['bn_ms'])} | {_ms(entry['bkn_ms'])} | {entry['ratio']:.2f}x "
            f"| {calls} | {syncs} |"
        )

    rows.append(row(f"layer fwd+bwd, 2 linked layers ({layer_shape}, s={s})", results["layer"]))
    wide_shape = (
        f"N={config['wide_batch']} C={config['wide_channels']} "
        f"{config['wide_size']}x{config['wide_size']}"
    )
    rows.append(row(f"layer fwd+bwd, 2 linked layers ({wide_shape}, s={s})", results["layer_wide"]))
    large_shape = f"batch {config['large_batch']}, {config['large_size']}x{config['large_size']}"
    for workload, shape in (("resnet20", step_shape), ("resnet50", large_shape)):
        for mode in ("eager", "compiled"):
            entry = results.get(f"step_{mode}_{workload}")
            if entry is not None:
                rows.append(row(f"train step, {workload}, {mode} ({shape}, s={s})", entry))
    memory = results["memory"]
    rows.append(
        f"| activation memory, resnet20 step ({memory['kind']}, MiB) | "
        f"{memory['bn_bytes'] / 2**20:.1f} | {memory['bkn_bytes'] / 2**20:.1f} | "
        f"{memory['ratio']:.2f}x | - | - |"
    )
    rows.append(row("folded inference, resnet20 (eval, fold())", results["folded"]))
    return "\n".join(rows)


def _notes(results: dict) -> list[str]:
    machine = results["machine"]
    notes = [
        f"torch {machine['torch']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f", {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads",
    ]
    if "load_average_start" in machine:
        start = machine["load_average_start"][0]
        end = machine.get("load_average_end", [start])[0]
        notes.append(f"1-min load average {start:.2f} at start, {end:.2f} at end")
    for key in ("step_compiled_resnet20", "step_compiled_resnet50"):
        compiled = results.get(key, {})
        if compiled.get("compile_s"):
            cache = compiled.get("compile_cache", {})
            times = ", ".join(
                f"{k} {v:.0f} s" + (f" (graph cache {cache[k]})" if cache.get(k) else "")
                for k, v in compiled["compile_s"].items()
            )
            notes.append(f"{key[14:]} compile + warm-up: {times}")
        if compiled.get("graph_breaks") is not None:
            breaks = ", ".join(f"{k} {v}" for k, v in compiled["graph_breaks"].items())
            notes.append(f"{key[14:]} graph breaks: {breaks}")
    notes.append(f"total {results['total_s']:.0f} s")
    return notes


def add_only_argument(parser: argparse.ArgumentParser) -> None:
    """``--only SECTION [SECTION ...]`` (default: every section)."""
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only these parts ({', '.join(SECTIONS)}; default: all)",
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m kalmannorm.lab.bench --help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no compile (1-2 min)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    add_only_argument(parser)
    args = parser.parse_args(argv)
    results = run_benchmark(
        quick=args.quick,
        compile=not args.no_compile,
        device=args.device,
        threads=args.threads,
        sections=tuple(args.only or SECTIONS),
        progress=_progress,
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
