"""Forward + backward time of every registered norm relative to native BatchNorm, one layer shape.

Two setups, each converted from a BatchNorm model with :func:`kalmannorm.convert_norm` (so every
norm is built exactly as a converted network builds it) and timed against the unconverted model
in the same rounds; a norm's row comes from the first setup it can run in:

``norm``
    ``Sequential(BatchNorm2d(C), BatchNorm2d(C))`` on an (N, C, H, W) input that requires grad:
    two layers, so a Kalman norm's second layer runs its prior. Not applicable to ``cbn``, which
    needs the convolution that feeds it.
``conv+norm``
    ``Sequential(Conv2d(C, C, 3, padding=1, bias=False), BatchNorm2d(C))``, CBN's per-step
    weight-gradient convolution included; for every norm with ``--with-conv``.

Norms that compute batch statistics (those taking ``stat_batch_size``: "bn", "brn", "cbn",
"bkn") use statistics groups of 2; the others are batch-free. Each round times ``iters`` calls of
the BatchNorm model and of the norm's, alternating which goes first; a time is the median over
rounds of the mean per call, a ratio the median of the per-round ratios (> 1: slower than
BatchNorm). Sizes: N=128, C=64, 32x32 (quick: N=32, C=16, 16x16).

``python -m kalmannorm.lab.bench_norms [--quick] [--json] [--with-conv]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kalmannorm.convert import available_norms, convert_norm, norm_spec

__all__ = ["format_rows", "norm_layer_rows"]

#: Norms that need a feeding convolution (timed only in the conv+norm setup).
NEEDS_CONV = ("cbn",)

_FULL = {"batch": 128, "channels": 64, "size": 32, "warmup": 2, "repeats": 5, "iters": 2}
_QUICK = {"batch": 32, "channels": 16, "size": 16, "warmup": 2, "repeats": 3, "iters": 2}


def _norm_pair(channels: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.BatchNorm2d(channels))


def _conv_norm(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
    )


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(grad)

    return call


def _compare(
    reference: Callable[[], None],
    candidate: Callable[[], None],
    sizes: dict,
    sync: Callable[[], None],
) -> tuple[float, float, float]:
    """(reference ms, candidate ms, median per-round ratio), rounds interleaved."""
    for call in (reference, candidate):
        for _ in range(sizes["warmup"]):
            call()
    sync()
    times: dict[int, list[float]] = {0: [], 1: []}
    calls = (reference, candidate)
    for round_index in range(sizes["repeats"]):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            sync()
            start = time.perf_counter()
            for _ in range(sizes["iters"]):
                calls[which]()
            sync()
            times[which].append((time.perf_counter() - start) * 1e3 / sizes["iters"])
    ratios = [c / r for r, c in zip(times[0], times[1])]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def _measure(
    build: Callable[[int], nn.Module],
    name: str,
    sizes: dict,
    device: torch.device,
    sync: Callable[[], None],
) -> tuple[float, float, float]:
    torch.manual_seed(0)
    c = sizes["channels"]
    reference = build(c).to(device)
    options = {"stat_batch_size": 2} if norm_spec(name).batch_statistics else {}
    candidate = convert_norm(copy.deepcopy(reference), name, **options)
    x = torch.randn(sizes["batch"], c, sizes["size"], sizes["size"], device=device)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    return _compare(_step(reference, x, grad), _step(candidate, x, grad), sizes, sync)


def norm_layer_rows(
    quick: bool, device: str | torch.device = "cpu", with_conv: bool = False
) -> list[dict]:
    """One row per registered norm: forward + backward time and its ratio to native BatchNorm.

    Rows: ``{"norm", "ms", "ratio_to_bn", "setup"}`` from the ``norm`` setup (two norm layers vs
    two BatchNorm2d), or from the ``conv+norm`` setup for norms that need a convolution
    (``setup`` says which). The first row, ``"torch_bn"``, is native BatchNorm itself (the median
    of its times over the norm-setup measurements). ``with_conv=True`` also times every norm in
    the ``conv+norm`` setup, adding ``conv_ms`` and ``conv_ratio_to_bn`` to every row.
    """
    sizes = _QUICK if quick else _FULL
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows: list[dict] = []
    bn_times: list[float] = []
    bn_conv_times: list[float] = []
    for name in available_norms():
        row: dict = {"norm": name}
        if with_conv or name in NEEDS_CONV:
            conv_bn_ms, conv_ms, conv_ratio = _measure(_conv_norm, name, sizes, device, sync)
            bn_conv_times.append(conv_bn_ms)
            row.update(conv_ms=conv_ms, conv_ratio_to_bn=conv_ratio)
        if name in NEEDS_CONV:
            row.update(ms=row["conv_ms"], ratio_to_bn=row["conv_ratio_to_bn"], setup="conv+norm")
            if not with_conv:
                del row["conv_ms"], row["conv_ratio_to_bn"]
        else:
            bn_ms, ms, ratio = _measure(_norm_pair, name, sizes, device, sync)
            bn_times.append(bn_ms)
            row.update(ms=ms, ratio_to_bn=ratio, setup="norm")
        rows.append({key: row[key] for key in _ROW_ORDER if key in row})
    reference = {
        "norm": "torch_bn",
        "ms": statistics.median(bn_times),
        "ratio_to_bn": 1.0,
        "setup": "norm",
    }
    if with_conv:
        reference.update(conv_ms=statistics.median(bn_conv_times), conv_ratio_to_bn=1.0)
    return [reference, *rows]


_ROW_ORDER = ("norm", "ms", "ratio_to_bn", "setup", "conv_ms", "conv_ratio_to_bn")


def format_rows(rows: list[dict]) -> str:
    """The rows as a fixed-width table."""
    with_conv = all("conv_ms" in row for row in rows)
    header = f"{'norm':<12}{'setup':<11}{'ms':>10}{'x BN':>8}"
    if with_conv:
        header += f"{'conv+norm ms':>14}{'x conv+BN':>11}"
    lines = [header]
    for row in rows:
        line = f"{row['norm']:<12}{row['setup']:<11}{row['ms']:>10.2f}{row['ratio_to_bn']:>8.2f}"
        if with_conv:
            line += f"{row['conv_ms']:>14.2f}{row['conv_ratio_to_bn']:>11.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--with-conv", action="store_true", help="time every norm after a conv")
    args = parser.parse_args(argv)
    rows = norm_layer_rows(args.quick, args.device, with_conv=args.with_conv)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
