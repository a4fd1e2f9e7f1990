"""Does inductor's C++ wrapper (``torch._inductor.config.cpp_wrapper``) cut BKN's compiled step?

Under ``torch.compile`` each compiled graph is called through a generated wrapper that launches
its kernels one by one: Python by default, C++ with ``cpp_wrapper``. BKN's graphs have many small
kernels (the Kalman step on (G, C) tensors), so the wrapper's per-kernel cost weighs more for it
than for BatchNorm. Two measurements, one torch thread, the micro rows' training step
(``kalmannorm.lab.bench_micro``: forward, cross-entropy, backward, SGD with momentum at lr 0;
statistics groups of 2):

``model``
    BatchNorm and ``bkn-flow``, each whole model compiled (``torch.compile(model)``) with the
    wrapper chosen by ``--cpp``, timed in interleaved rounds; one process per wrapper.
``steps``
    :func:`kalmannorm.compile_kalman_steps` in the eager model, each layer's small steps
    compiled with the Python wrapper and, in a second model, with the C++ one; both timed beside
    BatchNorm in interleaved rounds.

    python experiments/inductor_cpp_wrapper.py model [--cpp]
    python experiments/inductor_cpp_wrapper.py steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config

import kalmannorm.compiled_step
from kalmannorm.lab.bench_micro import _build, _data, _workload

CPU = torch.device("cpu")


def interleaved(workloads: dict, rounds: int) -> None:
    """Step times of ``workloads`` in rounds whose order alternates; medians and ratios to the
    first."""
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for round_ in range(rounds):
        order = list(workloads) if round_ % 2 == 0 else list(workloads)[::-1]
        for name in order:
            start = time.perf_counter()
            workloads[name].step()
            times[name].append(time.perf_counter() - start)
    first = statistics.median(next(iter(times.values())))
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:15s} {median * 1e3:8.1f} ms  {median / first:.3f}x BatchNorm")


def whole_model(batch: int, model_name: str, size: int, rounds: int) -> None:
    x, y = _data("classify", batch, size, CPU)
    workloads = {}
    for norm in ("torch_bn", "bkn-flow"):
        workloads[norm] = _workload(_build(model_name, norm, x, 2, CPU), x, y, compiled=True)
        start = time.perf_counter()
        for _ in range(3):
            workloads[norm].step()
        print(f"{norm}: compile + 3 steps {time.perf_counter() - start:.1f} s", flush=True)
    interleaved(workloads, rounds)


def compiled_steps(batch: int, model_name: str, size: int, rounds: int) -> None:
    x, y = _data("classify", batch, size, CPU)
    workloads = {"torch_bn": _workload(_build(model_name, "torch_bn", x, 2, CPU), x, y, False)}
    plain_compile = torch.compile

    def with_cpp_wrapper(fn, **options):
        options.setdefault("options", {})["cpp_wrapper"] = True
        return plain_compile(fn, **options)

    for name, compile_fn in (("python wrapper", plain_compile), ("c++ wrapper", with_cpp_wrapper)):
        kalmannorm.compiled_step.torch.compile = compile_fn
        start = time.perf_counter()
        model = _build(model_name, "bkn-flow+compiled-steps", x, 2, CPU)
        workloads[name] = _workload(model, x, y, False)
        workloads[name].step()
        workloads[name].step()
        print(f"{name}: compile + 2 steps {time.perf_counter() - start:.1f} s", flush=True)
    kalmannorm.compiled_step.torch.compile = plain_compile
    interleaved(workloads, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("model", "steps"))
    parser.add_argument("--cpp", action="store_true", help="model: the C++ wrapper")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "model":
        inductor_config.cpp_wrapper = args.cpp
        whole_model(args.batch, args.model, args.size, args.rounds)
    else:
        compiled_steps(args.batch, args.model, args.size, args.rounds)


if __name__ == "__main__":
    main()
