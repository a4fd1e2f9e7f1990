"""Private torch APIs live in one module, kalmannorm._torch_private, with their version gates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import kalmannorm
from kalmannorm import _torch_private

PACKAGE = Path(kalmannorm.__file__).parent
#: torch._x, torch.ops, torch.nn.modules.<m>._X, torch.utils._x, "from torch... import _x"
PRIVATE = re.compile(
    r"torch\._[A-Za-z]|torch\.ops\b|nn\.modules\.\w+\._[A-Za-z]|torch\.utils\._"
    r"|from torch[\w.]* import [^\n]*\b_[A-Za-z]"
)


def _library_files() -> list[Path]:
    lab = PACKAGE / "lab"
    return sorted(p for p in PACKAGE.rglob("*.py") if lab not in p.parents)


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_private_torch_apis_are_used_in_one_module_only(path: Path) -> None:
    if path.name == "_torch_private.py":
        return
    code = [
        (number, line)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line.split("#")[0]) and "``" not in line  # (docstrings name them)
    ]
    assert not code, f"{path.name}: private torch API outside _torch_private: {code}"


def test_checkpoint_recomputation_is_recognised_and_the_reentrant_one_is_not() -> None:
    seen: list[tuple[bool, bool]] = []

    def segment(x):
        seen.append((_torch_private.in_backward(), _torch_private.is_checkpoint_recomputation()))
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    checkpoint(segment, x, use_reentrant=False).sum().backward()
    assert seen == [(False, False), (True, True)]
    seen.clear()
    checkpoint(segment, x, use_reentrant=True).sum().backward()
    assert seen == [(False, False), (True, False)]


@pytest.mark.parametrize("length", [300, 4], ids=["kernel", "short-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_sum_kernel_equals_its_public_fallback(dtype, length, monkeypatch) -> None:
    """Both the kernel (long rows) and the matrix-vector products (short rows, on a CPU)."""
    a, b = torch.randn(1, 5, length).to(dtype), torch.randn(1, 5, length).to(dtype)
    fast = _torch_private.sum_and_dot_rows(a, b)
    monkeypatch.setattr(_torch_private, "_batch_norm_backward", None)
    public = _torch_private.sum_and_dot_rows(a, b)
    expected_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    for f, p in zip(fast, public):
        assert f.dtype == p.dtype == expected_dtype
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-3)


def test_the_version_gate_reads_the_running_torch() -> None:
    major, minor = _torch_private.TORCH_VERSION
    assert torch.__version__.startswith(f"{major}.{minor}")
    assert _torch_private.TORCH_VERSION >= (2, 13)  # the declared floor (pyproject.toml)


def test_the_sum_kernels_constants_are_cached_under_an_observing_mode_only() -> None:
    """Counted, a step makes the calls an uncounted one makes (the constants come from the
    cache); under a mode that may make tensors of its own (here a fake-tensor mode) they are made
    anew and not cached."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kalmannorm._dispatch_count import count_dispatch

    a, b = torch.randn(1, 7, 300), torch.randn(1, 7, 300)
    _torch_private.sum_and_dot_rows(a, b)  # the constants for 7 rows are in the cache
    with count_dispatch() as counts:
        _torch_private.sum_and_dot_rows(a, b)
    assert counts.calls == {"native_batch_norm_backward": 1}
    cached = _torch_private._sum_constants.cache_info().currsize
    with FakeTensorMode() as fake:
        sums = _torch_private.sum_and_dot_rows(fake.from_tensor(a), fake.from_tensor(b))
    assert sums[0].shape == (7,) and _torch_private._sum_constants.cache_info().currsize == cached
