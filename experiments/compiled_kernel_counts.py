"""Kernel calls of one forward + backward of a whole compiled, converted torchvision model, and
what they are (issue 17: launches are what a GPU pays per small operation).

Counted as ``kalmannorm bench``'s ``kernel_calls`` (``torch.profiler``, inductor's kernels named;
views and detaches included, which launch nothing): BN against each norm (``NORM+compiled-steps``:
the eager model with its Kalman steps compiled, ``compile_kalman_steps``), batch 4 (``--batch``),
64 px, statistics groups of 2, one torch thread. ``--gpu-form`` compiles the moment rules as on
a GPU (``moments.CONTRACTING_DEVICES`` takes the CPU too), so that the CPU runs the graphs a GPU
would; its CPU times are not a GPU's (inductor's C++ reductions are slow). Prints per norm the
count, the compile time and the kinds of calls (``fused``: inductor's kernels), and with
``--loop-nests`` the loop nests inductor generated (its caches off, so that it generates them):
its C++ backend emits consecutive loop nests as one function, one call, where on a GPU each fused
loop nest is a kernel of its own, so the nests plus the extern calls are the closer estimate of a
GPU's launches. With ``--rounds N`` also each norm's step time against the first norm's (N
rounds of 3 steps, the norms interleaved, the order alternating; the median).

    python experiments/compiled_kernel_counts.py --model resnet50 --gpu-form --rounds 9
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from kalmannorm import moments
from kalmannorm.lab.bench_micro import (
    COMPILED_STEPS,
    _build,
    _inductor_kernels_named,
    _workload,
    kernel_call_kinds,
)


def count_loop_nests() -> collections.Counter:
    """A counter of the loop nests inductor's C++ backend generates from now on (an outer-loop
    fusion of several nests counts each), its caches off."""
    import torch._functorch.config as functorch_config
    import torch._inductor.codegen.cpp as cpp
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    found: collections.Counter = collections.Counter()
    generate = cpp.CppScheduling.codegen_node

    def counted(self, node):
        outer = isinstance(node, cpp.OuterLoopFusedSchedulerNode)
        found["nests"] += len(node.get_outer_nodes()) if outer else 1
        return generate(self, node)

    cpp.CppScheduling.codegen_node = counted
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--norms", default="torch_bn,bkn-flow")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gpu-form", action="store_true")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--loop-nests", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.gpu_form:
        moments.CONTRACTING_DEVICES = moments.CONTRACTING_DEVICES | {"cpu"}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    nests = count_loop_nests() if args.loop_nests else None
    workloads = {}
    for norm in args.norms.split(","):
        if nests is not None:
            nests.clear()
            torch._dynamo.reset()
        model = _build(args.model, norm, x, 2, torch.device("cpu"))
        whole = not norm.endswith(COMPILED_STEPS)  # else the small steps compiled in an eager model
        workloads[norm] = workload = _workload(model, x, y, whole)
        start = time.perf_counter()
        with _inductor_kernels_named():
            for _ in range(2):
                workload.step()
        seconds = time.perf_counter() - start
        found = kernel_call_kinds(workload)
        listed = ", ".join(f"{name} {n}" for name, n in found.most_common())
        print(
            f"{args.model} {norm}: {found.total()} kernel calls (compile + 2 steps "
            f"{seconds:.0f} s): {listed}",
            flush=True,
        )
        if nests is not None:
            print(f"  loop nests generated: {nests['nests']}", flush=True)
    if args.rounds:
        timed(workloads, args.rounds)


def timed(workloads: dict, rounds: int) -> None:
    """Each workload's step time (median over ``rounds``) and its ratio to the first one's."""
    times: dict[str, list[float]] = {norm: [] for norm in workloads}
    ratios: dict[str, list[float]] = {norm: [] for norm in workloads}
    first = next(iter(workloads))
    for r in range(rounds):
        this: dict[str, float] = {}
        for norm in list(workloads)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for _ in range(3):
                workloads[norm].step()
            this[norm] = (time.perf_counter() - start) / 3
            times[norm].append(this[norm])
        for norm in workloads:
            ratios[norm].append(this[norm] / this[first])
    for norm in workloads:
        print(
            f"{norm}: {statistics.median(times[norm]) * 1e3:.1f} ms per step, "
            f"{statistics.median(ratios[norm]):.3f}x {first}'s",
            flush=True,
        )


if __name__ == "__main__":
    main()
