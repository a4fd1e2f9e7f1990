"""The data-flow prior's cost per convolution: the moment rule with its hand-written backward
(``kalmannorm.moments.convolution``) against the same formula through plain autograd and under
``torch.compile`` (which differentiates the formula itself).

One forward + backward of a dense convolution's output moments from (G, C_in) input moments, as
the data-flow prior runs it once per Kalman layer and training step; weight-sized work, so the
same at any activation size. Shapes: ResNet-50's last-stage 3x3 (a 2x2 map at 64 px) and 1x1
convolutions and a third-stage 3x3, at statistics groups G = 2 (batch 4, s = 2) and G = 64
(batch 128). Rounds alternate the rules; each prints the median over rounds.

    python experiments/conv_moments_backward.py
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from kalmannorm import moments as mo

ROUNDS, STEPS = 7, 3
CASES = [  # (G, weight shape, input size)
    (2, (512, 512, 3, 3), 2),
    (64, (512, 512, 3, 3), 2),
    (2, (256, 256, 3, 3), 4),
    (64, (256, 256, 3, 3), 4),
    (2, (2048, 512, 1, 1), 2),
    (64, (2048, 512, 1, 1), 2),
]


def composite(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, geometry):
    """The rule's formula in plain autograd operations (the code before the hand-written one)."""
    taps = weight.reshape(*weight.shape[:2], -1)
    valid = geometry.valid.to(mean)
    out_mean = mean @ (taps @ valid).T
    out_var = var @ (taps.square() @ valid).T
    if geometry.bordered:
        tap_means = torch.einsum("gi,oik->gok", mean, taps)
        out_var = out_var + ((tap_means @ geometry.spread.to(mean)) * tap_means).sum(-1)
    return out_mean, out_var.clamp_min(0.0)


def library(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, geometry):
    return tuple(mo.convolution(mo.Moments(mean, var), weight, None, 1, geometry))


def _compiled(rule, geometry):
    def bound(mean, var, weight):
        return rule(mean, var, weight, geometry)

    return torch.compile(bound, dynamic=False, fullgraph=True)


def main() -> None:
    torch.set_num_threads(1)
    for groups, shape, size in CASES:
        torch.compiler.reset()  # each case compiles its own functions (no recompile limit)
        kernel = shape[-1]
        weight = torch.randn(*shape, requires_grad=True)
        mean = torch.randn(groups, shape[1], requires_grad=True)
        var = torch.rand(groups, shape[1], requires_grad=True)
        geometry = mo.tap_geometry(
            (size, size), (kernel, kernel), (1, 1), (kernel // 2, kernel // 2), (1, 1)
        )
        rules = {
            "autograd": functools.partial(composite, geometry=geometry),
            "hand-written": functools.partial(library, geometry=geometry),
            "compiled": _compiled(library, geometry),
        }
        times: dict[str, list[float]] = {name: [] for name in rules}
        for rule in rules.values():  # compile, warm up
            out_mean, out_var = rule(mean, var, weight)
            (out_mean.sum() + out_var.sum()).backward()
        for _ in range(ROUNDS):
            for name, rule in rules.items():
                start = time.perf_counter()
                for _ in range(STEPS):
                    out_mean, out_var = rule(mean, var, weight)
                    (out_mean.sum() + out_var.sum()).backward()
                times[name].append((time.perf_counter() - start) / STEPS * 1e3)
        medians = {name: statistics.median(t) for name, t in times.items()}
        eager = medians["hand-written"] / medians["autograd"]
        compiled = medians["compiled"] / medians["hand-written"]
        print(
            f"G {groups:3d} weight {shape} on {size}x{size}: "
            + ", ".join(f"{name} {ms:6.2f} ms" for name, ms in medians.items())
            + f" (hand-written / autograd {eager:.2f}x, compiled / hand-written {compiled:.2f}x)"
        )


if __name__ == "__main__":
    main()
