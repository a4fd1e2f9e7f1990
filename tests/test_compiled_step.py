"""Compiled small steps (``kalmannorm.compile_kalman_steps``, issue 17): the same training as the
eager step, in compiled code per layer.

The reference is the same model without the option: its written small steps, run eagerly.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import randomize_kalman
from torch import nn

import kalmannorm
from kalmannorm._dispatch_count import count_dispatch


class _Block(nn.Module):
    """A pre-activation residual block: the programs hold convolutions, ReLUs and a sum."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(branch)))


def _model(norm: str, x: torch.Tensor, **options: object) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _Block(6), nn.BatchNorm2d(6))
    options = {**_options(norm), **options}
    model = kalmannorm.convert_norm(model.double(), norm, **options, example_input=x)
    randomize_kalman(model)
    return model.train()


def _options(norm: str) -> dict:
    return {} if norm == "gkn" else {"stat_batch_size": 2}


def _train(model: nn.Module, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Outputs of ``steps`` SGD steps (lr 0.1) on a fixed loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.linspace(-1, 1, x[:, :1].numel(), dtype=x.dtype).view_as(x[:, :1])
    outputs = []
    for _ in range(steps):
        y = model(x)
        ((y - target).square().mean() + y.std()).backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(y.detach())
    return outputs


@pytest.mark.parametrize(
    ("norm", "options"),
    [("bkn-flow", {}), ("bkn-flow", {"calibrate_prior": True}), ("bkn", {}), ("gkn", {})],
)
def test_compiled_steps_train_as_the_eager_steps(norm: str, options: dict) -> None:
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    eager, compiled = _model(norm, x, **options), _model(norm, x, **options)
    kalmannorm.compile_kalman_steps(compiled)
    for got, want in zip(_train(compiled, x, 3), _train(eager, x, 3)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for (name, got), (_, want) in zip(compiled.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)
    chains = {m.chain for m in compiled.modules() if getattr(m, "chain", None) is not None}
    owners = [*compiled.modules(), *chains]
    assert any("_compiled_steps" in owner.__dict__ for owner in owners)  # it did compile
    compiled.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-9, atol=1e-10)


def test_a_copy_or_pickle_compiles_again_and_the_option_turns_off() -> None:
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    model = kalmannorm.compile_kalman_steps(_model("bkn-flow", x))
    _train(model, x, 1)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not any(m.__dict__.get("_compiled_steps") for m in clone.modules())
        torch.testing.assert_close(_train(clone, x, 1)[0], _train(copy.deepcopy(model), x, 1)[0])
    kalmannorm.compile_kalman_steps(model, enabled=False)
    assert not any("_compiled_steps" in m.__dict__ for m in model.modules())
    reference = copy.deepcopy(model)
    kalmannorm.compile_kalman_steps(reference, enabled=False)
    torch.testing.assert_close(_train(model, x, 1)[0], _train(reference, x, 1)[0])


def test_under_a_dispatch_mode_the_steps_run_as_written() -> None:
    # compiled code does not run under a TorchDispatchMode: the step counts as the eager one
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    counts = []
    for compile_steps in (False, True):
        model = _model("bkn-flow", x)
        kalmannorm.compile_kalman_steps(model, enabled=compile_steps)
        _train(model, x, 1)
        with count_dispatch() as counted:
            model(x).sum().backward()
        counts.append(counted.aten_calls)
    assert counts[0] == counts[1]


def test_a_model_without_kalman_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no Kalman layer.*convert_norm"):
        kalmannorm.compile_kalman_steps(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_compiled_steps_under_activation_checkpointing() -> None:
    # the recomputation replays the compiled estimate; gradients as without checkpointing
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    plain = kalmannorm.compile_kalman_steps(_model("bkn-flow", x))
    checkpointed = copy.deepcopy(plain)
    block = checkpointed[1]
    block.forward = lambda t, f=block.forward: checkpoint(f, t, use_reentrant=False)
    for model in (plain, checkpointed):
        model(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_a_compiler_failure_is_one_line_naming_the_layer_and_the_fix(monkeypatch) -> None:
    from kalmannorm import _torch_private, compiled_step

    (failure,) = _torch_private.COMPILER_FAILURES

    def broken_compile(fn, **options):
        def run(*args):
            raise failure(None, OSError("no C++ compiler found\nmore detail"), None)

        return run

    monkeypatch.setattr(compiled_step.torch, "compile", broken_compile)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    model = kalmannorm.compile_kalman_steps(_model("bkn-flow", x))
    with pytest.raises(RuntimeError) as raised:
        model(x)
    message = str(raised.value)
    assert "\n" not in message and "no C++ compiler found" in message
    assert "data-flow prediction of '1.bn2'" in message  # the first with a prior
    assert "compile_kalman_steps(model, enabled=False)" in message
