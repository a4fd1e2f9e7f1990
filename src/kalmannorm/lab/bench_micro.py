"""Training steps at the batch sizes the library exists for: time, ATen calls and host syncs.

For each model of :data:`MODELS` and each batch size, one training step (forward, loss,
backward, SGD step) of the model with torch's BatchNorm over the whole batch against the same
model converted to each norm of ``norms`` (a registered name, Kalman or baseline; statistics
groups of ``stat_batch_size`` for norms with batch statistics, ``bn`` among them as ghost BN;
chain traced on the input at conversion), measured three ways:

``ratio``
    step time / BatchNorm's step time: all models of one (model, batch) timed in the same rounds,
    the order rotating between rounds; the median over rounds of the per-round ratio (> 1:
    slower). The ``second-bn`` row is a second, identical BatchNorm model: its ratio is this
    machine's noise floor.
``ratio_range``
    the smallest and largest per-round ratio: how far one round's ratio moved from the median
    (with three rounds at batch 128, the run's own spread).
``aten_calls`` and ``aten_calls_ratio``
    ATen operations dispatched in one forward + backward (loss included), counted below autograd
    with a ``TorchDispatchMode`` (:mod:`kalmannorm._dispatch_count`), and that count over
    BatchNorm's. Each is a kernel launch on a GPU, so at micro-batch sizes this ratio, not the
    FLOPs, predicts the step time there. The same on every device.
``kernel_calls`` and ``kernel_calls_ratio``
    the same forward + backward counted by ``torch.profiler`` (:func:`kernel_calls`): ATen
    operations called from Python or from compiled code plus inductor's own kernels, or on a GPU
    the kernels launched. Unlike the dispatch-mode count it sees inside compiled code, so it is
    the one count of the ``<norm>+compiled-steps`` rows (the norm with
    :func:`kalmannorm.compile_kalman_steps`; their ``first_step_s`` includes compiling).
``host_syncs_per_step``
    device-to-host reads (``item``/``_local_scalar_dense``, ``equal``, ``nonzero``, a copy to
    the CPU, ...) in one forward + backward + optimizer step: each stalls a GPU's stream.
``page_faults_per_step`` (eager rows, where the OS counts them)
    the process's minor page faults per timed step (median over rounds): memory the allocator
    took from the system again. On a CPU each costs the step time (about 4 us on this project's
    VM, where glibc's allocator gave a ResNet-50 ``bkn-flow`` step at batch 4 thousands and
    BatchNorm's none); a GPU's caching allocator has no such cost, so a CPU ratio with many
    faults overstates what a GPU would see (``LD_PRELOAD`` a caching allocator such as
    tcmalloc to time without them).

The optimizer is SGD with momentum at learning rate 0: it runs all its operations, and every
timed step does the same work on the same weights (no run can diverge midway; the bkn-flow
MobileNetV2 at 32 px and batch 4 reaches NaN after 4 steps at learning rate 1e-3). Counts are
taken on the step after a warm-up step (the optimizer's momentum buffers exist, the
chain is traced), and are eager-mode counts. Compiled rows (``compile_batches``) time
``torch.compile(model)`` the same way after a warm-up that includes compilation; they carry no
counts.

Models: torchvision's ResNet-50 and MobileNetV2 (classification, cross-entropy with labels in
0-9), and the ResNet-50 FPN backbone of torchvision's Faster R-CNN / RetinaNet
(``resnet_fpn_backbone``, every stage trainable, as ``fasterrcnn_resnet50_fpn(weights=None)``
builds it) with a shared 1x1 classification head over every FPN level (cross-entropy per
position): what a detection user converts.

``python -m kalmannorm.lab.bench_micro [--quick] [--json PATH] [--models resnet50:64]
[--batches 4] [--norms bkn-flow]``; part of ``kalmannorm bench``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_f

from kalmannorm._dispatch_count import count_dispatch
from kalmannorm.compiled_step import compile_kalman_steps
from kalmannorm.convert import available_norms, convert_norm, norm_spec

__all__ = [
    "MODELS",
    "MicroConfig",
    "Workload",
    "format_micro_table",
    "kernel_calls",
    "micro_rows",
    "step_counts",
]

NUM_CLASSES = 10


class DetectionBackbone(nn.Module):
    """torchvision's ResNet FPN backbone (every stage trainable, BatchNorm) with a shared 1x1
    convolution classifying every position of every FPN level: a detection-shaped training step
    without the box heads' data-dependent sampling (whose syncs are not the norms')."""

    def __init__(self, backbone_name: str = "resnet50") -> None:
        super().__init__()
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        self.backbone = resnet_fpn_backbone(
            backbone_name=backbone_name, weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d
        )
        self.head = nn.Conv2d(self.backbone.out_channels, NUM_CLASSES, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, NUM_CLASSES, P) logits over all P positions of all levels."""
        levels = self.backbone(x).values()
        return torch.cat([self.head(f).flatten(2) for f in levels], dim=2)


def _resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None)


def _mobilenet_v2() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None)


#: name -> (builder, kind); kind "classify": (N, K) logits, "dense": (N, K, P) logits.
MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet50": (_resnet50, "classify"),
    "mobilenet_v2": (_mobilenet_v2, "classify"),
    "resnet50_fpn": (DetectionBackbone, "dense"),
    "resnet18_fpn": (lambda: DetectionBackbone("resnet18"), "dense"),  # the quick run's
}


@dataclass(frozen=True)
class MicroConfig:
    """Models, sizes and repeat counts of the micro-batch rows."""

    #: model name -> input image size (square, pixels).
    models: tuple[tuple[str, int], ...] = (
        ("resnet50", 64),
        ("mobilenet_v2", 64),
        ("resnet50_fpn", 128),
    )
    batches: tuple[int, ...] = (2, 4, 8)
    #: a large batch for the classification models (the ratio where activations dominate).
    large_batch: int | None = 128
    large_models: tuple[str, ...] = ("resnet50", "mobilenet_v2")
    norms: tuple[str, ...] = ("bkn", "bkn-flow")
    #: norms of ``norms`` also measured with their small steps compiled in the eager model
    #: (:func:`kalmannorm.compile_kalman_steps`), as the row ``<norm>+compiled-steps``.
    compiled_steps: tuple[str, ...] = ("bkn-flow",)
    #: batch sizes with those rows (each new shape compiles again: minutes from a cold cache).
    compiled_steps_batches: tuple[int, ...] = (4,)
    stat_batch_size: int = 2
    warmup: int = 2
    repeats: int = 5
    iters: int = 2
    large_warmup: int = 0
    large_repeats: int = 3
    large_iters: int = 1
    #: batch sizes with compiled rows (for ``compile_models``); empty: none.
    compile_batches: tuple[int, ...] = (4,)
    compile_models: tuple[str, ...] = ("resnet50", "mobilenet_v2")
    compile_warmup: int = 2
    compile_repeats: int = 3
    compile_iters: int = 2


FULL_MICRO = MicroConfig()
QUICK_MICRO = MicroConfig(
    models=(("mobilenet_v2", 32), ("resnet18_fpn", 32)),
    batches=(4,),
    large_batch=None,
    warmup=0,
    repeats=2,
    iters=1,
    compile_batches=(),
    compiled_steps=(),
)


# -- one training step ------------------------------------------------------------------------


def _data(kind: str, batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    if kind == "classify":
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    else:  # the label of every FPN position: their count is the head's output width
        y = torch.zeros(0, dtype=torch.long)
    return x.to(device), y.to(device)


def _dense_labels(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        positions = model.eval()(x[:1]).shape[2]
    model.train()
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, NUM_CLASSES, (x.shape[0], positions), generator=generator).to(x.device)


@dataclass
class Workload:
    """One model's training step: ``forward_backward`` (zero_grad, loss, backward) and ``step``
    (that and the optimizer's step)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    run: Callable[[Tensor], Tensor]
    x: Tensor
    y: Tensor

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # (N, K) logits or, dense, (N, K, P) with a label per position
        torch_f.cross_entropy(self.run(self.x), self.y).backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()


#: The suffix of a norm's row with compiled small steps.
COMPILED_STEPS = "+compiled-steps"
#: The row of a second torch BatchNorm model, timed beside the first: the noise floor.
SECOND_BN = "second-bn"


def _build(
    model_name: str, norm: str, x: Tensor, stat_batch_size: int, device: torch.device
) -> nn.Module:
    """The model with BatchNorm ("torch_bn") or converted to ``norm``, same initial weights
    (``<norm>+compiled-steps``: with :func:`kalmannorm.compile_kalman_steps`)."""
    torch.manual_seed(0)
    model = MODELS[model_name][0]().to(device).train()
    if norm != "torch_bn":
        base = norm.removesuffix(COMPILED_STEPS)
        grouped = norm_spec(base).batch_statistics
        options = {"stat_batch_size": stat_batch_size} if grouped else {}
        model = convert_norm(model, base, example_input=x, **options)
        if base != norm:
            compile_kalman_steps(model)
    return model.train()


def _workload(model: nn.Module, x: Tensor, y: Tensor, compiled: bool) -> Workload:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    run = torch.compile(model) if compiled else model
    return Workload(model, optimizer, run, x, y)


def kernel_calls(workload: Workload) -> int:
    """Kernel calls of one forward + backward, counted by ``torch.profiler``: on a GPU the
    kernels launched; on a CPU the ATen operations called from Python or from compiled code (not
    the ones they call in turn) plus the kernels inductor generated (named in the trace where
    ``torch._inductor.config.cpp.enable_kernel_profile`` was on when they were compiled). Unlike
    :func:`step_counts`' dispatch-mode count, it sees inside compiled code."""
    return sum(kernel_call_kinds(workload).values())


def kernel_call_kinds(workload: Workload) -> collections.Counter:
    """The calls :func:`kernel_calls` counts, by name: CUDA kernels where any ran, else
    inductor's kernels (as ``fused``) and the top-level ATen operations (``aten::`` dropped)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as trace:
        workload.forward_backward()
    events = trace.events()
    launched = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if launched:
        return collections.Counter(e.name for e in launched)
    found: collections.Counter = collections.Counter()
    for event in events:
        if "cpp_fused" in event.name:
            found["fused"] += 1
        elif event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if parent is None:
                found[event.name.removeprefix("aten::")] += 1
    return found


def step_counts(workload: Workload) -> dict:
    """ATen calls of one forward + backward and host syncs of one whole step (counted once)."""
    with count_dispatch() as forward_backward:
        workload.forward_backward()
    with count_dispatch() as optimizer_step:
        workload.optimizer.step()
    syncs = forward_backward.syncs + optimizer_step.syncs
    return {
        "aten_calls": forward_backward.aten_calls,
        "step_aten_calls": forward_backward.aten_calls + optimizer_step.aten_calls,
        "host_syncs_per_step": sum(syncs.values()),
        "host_sync_ops": dict(sorted(syncs.items())),
    }


# -- timing -----------------------------------------------------------------------------------


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (pages the kernel mapped on first touch: fresh
    memory from the system), or ``None`` where the OS does not count them."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_rounds(
    calls: dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    iters: int,
    sync: Callable[[], None],
    faults: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per-round mean ms per call of each callable (after ``warmup`` calls of each); the order
    rotates from round to round, so that no callable always runs first or after the same one.
    ``faults``, where given, receives each round's minor page faults per call of each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    sync()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        if (round_index // len(names)) % 2:
            order.reverse()
        for name in order:
            sync()
            first_fault = minor_page_faults()
            start = time.perf_counter()
            for _ in range(iters):
                calls[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3 / iters)
            if faults is not None and first_fault is not None:
                faults.setdefault(name, []).append((minor_page_faults() - first_fault) / iters)
    return samples


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _short_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:160]


def _eager_rows(
    model_name: str, size: int, batch: int, config: MicroConfig, device: torch.device, large: bool
) -> list[dict]:
    kind = MODELS[model_name][1]
    x, y = _data(kind, batch, size, device)
    names = ["torch_bn", SECOND_BN, *_norm_rows(config, batch)]
    workloads: dict[str, Workload] = {}
    errors: dict[str, str] = {}
    first_step_s: dict[str, float] = {}
    for name in names:
        try:
            built = "torch_bn" if name == SECOND_BN else name
            model = _build(model_name, built, x, config.stat_batch_size, device)
            if kind == "dense" and not y.numel():
                y = _dense_labels(model, x)
            workloads[name] = _workload(model, x, y, compiled=False)
            start = time.perf_counter()
            with _inductor_kernels_named():  # compiled small steps compile here
                workloads[name].step()  # momentum buffers exist, any first-call work is done
            first_step_s[name] = time.perf_counter() - start
        except Exception as error:  # a norm that cannot run here is a result
            errors[name] = _short_error(error)
            workloads.pop(name, None)
    # a dispatch mode runs compiled steps as written: no dispatch counts for those rows
    counts = {name: step_counts(w) for name, w in workloads.items() if COMPILED_STEPS not in name}
    for name, workload in workloads.items():
        counts.setdefault(name, {})["kernel_calls"] = kernel_calls(workload)
        counts[name]["first_step_s"] = first_step_s[name]
    repeats, iters = (config.repeats, config.iters)
    if large:
        repeats, iters = (config.large_repeats, config.large_iters)
    calls = {name: w.step for name, w in workloads.items()}
    faults: dict[str, list[float]] = {}
    try:
        samples = timed_rounds(calls, config.warmup, repeats, iters, synchronizer(device), faults)
    except Exception as error:  # reported on every row of this (model, batch)
        samples, errors = {}, dict.fromkeys(names, _short_error(error))
    for name, per_round in faults.items():
        counts.setdefault(name, {})["page_faults_per_step"] = statistics.median(per_round)
    return _rows(model_name, size, batch, config, "eager", samples, counts, errors)


def _compiled_rows(
    model_name: str, size: int, batch: int, config: MicroConfig, device: torch.device
) -> list[dict]:
    import torch._dynamo

    kind = MODELS[model_name][1]
    x, y = _data(kind, batch, size, device)
    torch._dynamo.reset()
    calls: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    counts: dict[str, dict] = {}
    graph_breaks: dict[str, int | None] = {}
    errors: dict[str, str] = {}
    for name in ["torch_bn", *config.norms]:
        try:
            _clear_dynamo_counters()
            model = _build(model_name, name, x, config.stat_batch_size, device)
            if kind == "dense" and not y.numel():
                y = _dense_labels(model, x)
            workload = _workload(model, x, y, compiled=True)
            start = time.perf_counter()
            with _inductor_kernels_named():  # inductor's kernels named in the profiler's trace
                for _ in range(config.compile_warmup):
                    workload.step()
            synchronizer(device)()
            compile_s[name] = time.perf_counter() - start
            graph_breaks[name] = _graph_breaks()
            counts[name] = {"kernel_calls": kernel_calls(workload)}
            calls[name] = workload.step
        except Exception as error:  # a compile failure is a result
            errors[name] = _short_error(error)
    samples: dict[str, list[float]] = {}
    if "torch_bn" in calls:
        try:
            samples = timed_rounds(
                calls, 0, config.compile_repeats, config.compile_iters, synchronizer(device)
            )
        except Exception as error:  # reported on every row of this (model, batch)
            errors = dict.fromkeys(["torch_bn", *config.norms], _short_error(error))
    rows = _rows(model_name, size, batch, config, "compiled", samples, counts, errors)
    for row in rows:
        row["compile_s"] = compile_s.get(row["norm"])
        row["bn_compile_s"] = compile_s.get("torch_bn")
        row["graph_breaks"] = graph_breaks.get(row["norm"])
    return rows


def _norm_rows(config: MicroConfig, batch: int) -> list[str]:
    """The norms of the eager rows at ``batch``: ``norms``, then those of ``compiled_steps``
    compiled (at ``compiled_steps_batches``)."""
    if batch not in config.compiled_steps_batches:
        return list(config.norms)
    compiled = [n + COMPILED_STEPS for n in config.compiled_steps if n in config.norms]
    return [*config.norms, *compiled]


def _inductor_kernels_named():
    """Inductor's CPU kernels named in profiler traces while they compile (for
    :func:`kernel_calls`)."""
    import torch._inductor.config

    return torch._inductor.config.patch({"cpp.enable_kernel_profile": True})


def _clear_dynamo_counters() -> None:
    try:
        from torch._dynamo.utils import counters

        counters.clear()
    except Exception:  # pragma: no cover - private API
        pass


def _graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # pragma: no cover - private API
        return None


def _rows(
    model_name: str,
    size: int,
    batch: int,
    config: MicroConfig,
    mode: str,
    samples: dict[str, list[float]],
    counts: dict[str, dict],
    errors: dict[str, str],
) -> list[dict]:
    """One row per norm (BatchNorm's own times and counts on every row)."""
    reference = samples.get("torch_bn")
    bn_counts = counts.get("torch_bn", {})
    rows = []
    norms = _norm_rows(config, batch) if mode == "eager" else config.norms
    for name in [n for n in (SECOND_BN, *norms) if n in samples or n in errors]:
        row: dict = {
            "model": model_name,
            "image_size": size,
            "batch": batch,
            "stat_batch_size": config.stat_batch_size,
            "mode": mode,
            "norm": name,
        }
        if name in errors or reference is None:
            row["error"] = errors.get(name) or errors.get("torch_bn", "BatchNorm failed")
            rows.append(row)
            continue
        times = samples[name]
        ratios = [t / r for t, r in zip(times, reference)]
        row.update(
            bn_ms=statistics.median(reference),
            ms=statistics.median(times),
            ratio=statistics.median(ratios),
            ratio_range=[min(ratios), max(ratios)],
        )
        mine = counts.get(name, {})
        if "kernel_calls" in mine and "kernel_calls" in bn_counts:
            row.update(
                bn_kernel_calls=bn_counts["kernel_calls"],
                kernel_calls=mine["kernel_calls"],
                kernel_calls_ratio=mine["kernel_calls"] / bn_counts["kernel_calls"],
            )
        if "first_step_s" in mine:
            row["first_step_s"] = mine["first_step_s"]
        if "page_faults_per_step" in mine and "page_faults_per_step" in bn_counts:
            row.update(
                bn_page_faults_per_step=bn_counts["page_faults_per_step"],
                page_faults_per_step=mine["page_faults_per_step"],
            )
        if "aten_calls" in mine and bn_counts:
            row.update(
                bn_aten_calls=bn_counts["aten_calls"],
                aten_calls=mine["aten_calls"],
                aten_calls_ratio=mine["aten_calls"] / bn_counts["aten_calls"],
                bn_host_syncs_per_step=bn_counts["host_syncs_per_step"],
                host_syncs_per_step=mine["host_syncs_per_step"],
                host_sync_ops=mine["host_sync_ops"],
                step_aten_calls=mine["step_aten_calls"],
            )
        rows.append(row)
    return rows


# -- the section ------------------------------------------------------------------------------


def micro_rows(
    quick: bool = False,
    device: str | torch.device = "cpu",
    config: MicroConfig | None = None,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The micro-batch section: ``{"config", "rows", "headline", "total_s"}``.

    ``rows``: one dict per (model, batch, mode, norm) as in the module docstring (an ``error``
    instead of the measurements where a model or norm failed). ``headline``: the eager rows of
    ``norms`` (``bkn`` and ``bkn-flow`` by default) of the first model at batch 4 (else its first
    batch) with the largest calls ratio and sync count over all their eager rows.
    """
    device = torch.device(device)
    config = config or (QUICK_MICRO if quick else FULL_MICRO)
    started = time.perf_counter()
    rows: list[dict] = []
    try:
        import torchvision  # noqa: F401  (every model of MODELS is torchvision's)
    except ImportError:
        return {
            "config": asdict(config),
            "rows": [],
            "headline": {},
            "total_s": 0.0,
            "skipped": "torchvision is not installed",
        }
    for model_name, size in config.models:
        batches = list(config.batches)
        if config.large_batch and model_name in config.large_models:
            batches.append(config.large_batch)
        for batch in batches:
            if progress:
                progress(f"micro: {model_name} batch {batch} eager")
            large = batch == config.large_batch and batch not in config.batches
            rows += _eager_rows(model_name, size, batch, config, device, large)
            if compile and batch in config.compile_batches and model_name in config.compile_models:
                if progress:
                    progress(f"micro: {model_name} batch {batch} compiled")
                rows += _compiled_rows(model_name, size, batch, config, device)
    return {
        "config": asdict(config),
        "rows": rows,
        "headline": headline(rows),
        "total_s": time.perf_counter() - started,
    }


def headline(rows: list[dict]) -> dict:
    """The summary figures of the micro rows (see :func:`micro_rows`)."""
    eager = [r for r in rows if r["mode"] == "eager" and "aten_calls_ratio" in r]
    kalman = [r for r in eager if r["norm"] != SECOND_BN]
    if not kalman:
        return {}
    first = kalman[0]["model"]
    batches = sorted({r["batch"] for r in kalman if r["model"] == first})
    batch = 4 if 4 in batches else batches[0]
    out: dict = {"model": first, "batch": batch}
    for r in kalman:
        if r["model"] == first and r["batch"] == batch:
            out[r["norm"]] = {
                key: r[key]
                for key in ("ratio", "aten_calls_ratio", "host_syncs_per_step", "aten_calls")
            }
    out["aten_calls_ratio_max"] = max(r["aten_calls_ratio"] for r in kalman)
    out["host_syncs_per_step_max"] = max(r["host_syncs_per_step"] for r in kalman)
    return out


def format_micro_table(section: dict) -> str:
    """A Markdown table of the micro rows."""
    if "skipped" in section:
        return f"micro-batch rows skipped: {section['skipped']}"
    lines = [
        "| model (px) | batch | mode | norm | BN ms | norm ms | time / BN (rounds' range) "
        "| ATen calls (BN) | calls / BN | kernel calls (BN) | kernels / BN "
        "| host syncs / step (BN) | page faults / step (BN) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in section["rows"]:
        head = f"| {r['model']} ({r['image_size']}) | {r['batch']} | {r['mode']} | {r['norm']} |"
        if "error" in r:
            lines.append(f"{head} - | - | {r['error']} | - | - | - | - | - | - |")
            continue
        calls = ratio = syncs = kernels = kernel_ratio = faults = "-"
        if "page_faults_per_step" in r:
            faults = f"{r['page_faults_per_step']:,.0f} ({r['bn_page_faults_per_step']:,.0f})"
        if "kernel_calls" in r:
            kernels = f"{r['kernel_calls']:,} ({r['bn_kernel_calls']:,})"
            kernel_ratio = f"{r['kernel_calls_ratio']:.2f}x"
        if "aten_calls" in r:
            calls = f"{r['aten_calls']:,} ({r['bn_aten_calls']:,})"
            ratio = f"{r['aten_calls_ratio']:.2f}x"
            syncs = f"{r['host_syncs_per_step']} ({r['bn_host_syncs_per_step']})"
        elif r.get("graph_breaks"):
            syncs = f"{r['graph_breaks']} graph breaks"
        spread = ""  # (rows saved before the range was recorded have none)
        if "ratio_range" in r:
            spread = " ({:.2f}-{:.2f})".format(*r["ratio_range"])
        lines.append(
            f"{head} {r['bn_ms']:.1f} | {r['ms']:.1f} | {r['ratio']:.2f}x{spread} | {calls} "
            f"| {ratio} | {kernels} | {kernel_ratio} | {syncs} | {faults} |"
        )
    s = section["config"]["stat_batch_size"]
    compiled = [r for r in section["rows"] if r.get("compile_s") is not None]
    notes = [
        f"norms with batch statistics in groups of {s}, BatchNorm over the whole batch; "
        f"{SECOND_BN}: a second torch BatchNorm model (the noise floor)"
    ]
    if compiled:
        times = ", ".join(
            f"{r['model']} b{r['batch']} {r['norm']} {r['compile_s']:.0f} s" for r in compiled
        )
        bn_times = ", ".join(
            f"{r['model']} b{r['batch']} {r['bn_compile_s']:.0f} s"
            for r in compiled
            if r["norm"] == section["config"]["norms"][0] and r.get("bn_compile_s") is not None
        )
        notes.append(f"compile + warm-up: {times}; BatchNorm {bn_times}")
    firsts = [r for r in section["rows"] if COMPILED_STEPS in r["norm"] and "first_step_s" in r]
    if firsts:
        notes.append(
            "first step with compiled small steps (compilation): "
            + ", ".join(f"{r['model']} b{r['batch']} {r['first_step_s']:.0f} s" for r in firsts)
        )
    notes.append(f"section {section['total_s']:.0f} s")
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def _print_progress(line: str) -> None:
    print(line, flush=True)


def _chosen_config(config: MicroConfig, args: argparse.Namespace) -> MicroConfig:
    """``config`` with the models, batches and norms given on the command line (given batches:
    no separate large batch)."""
    changes: dict = {}
    if args.models:
        models = []
        for item in args.models.split(","):
            name, _, pixels = item.partition(":")
            if name not in MODELS or not pixels.isdigit():
                raise SystemExit(
                    f"--models takes MODEL:PIXELS with MODEL one of {', '.join(MODELS)}, got "
                    f"{item!r}"
                )
            models.append((name, int(pixels)))
        changes["models"] = tuple(models)
    if args.batches:
        changes["batches"] = tuple(int(b) for b in args.batches.split(","))
        changes["large_batch"] = None
    if args.norms:
        norms = tuple(args.norms.split(","))
        unknown = [n for n in norms if n not in available_norms()]
        if unknown:
            raise SystemExit(
                f"--norms takes registered norms ({', '.join(available_norms())}), got "
                f"{', '.join(map(repr, unknown))}"
            )
        changes["norms"] = norms
    return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, batch 4, no compile")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the section as JSON")
    parser.add_argument(
        "--models", help="comma-separated MODEL:PIXELS (default: the full run's), e.g. resnet50:64"
    )
    parser.add_argument("--batches", help="comma-separated batch sizes (default: 2,4,8 and 128)")
    parser.add_argument(
        "--norms",
        help="comma-separated registered norms (default: bkn,bkn-flow); bn: ghost BN in groups",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = None
    if args.models or args.batches or args.norms:
        config = _chosen_config(QUICK_MICRO if args.quick else FULL_MICRO, args)
    section = micro_rows(
        args.quick, args.device, config, compile=not args.no_compile, progress=_print_progress
    )
    print(format_micro_table(section))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(section, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
