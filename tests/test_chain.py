"""The execution-order chain: isolation between models, passes and threads; order checks."""

import copy
import io
import threading

import pytest
import torch
from conftest import conv_bn_stack, randomize_kalman
from torch import nn

import kalmannorm
from kalmannorm import ChainOrderError


class Swapped(nn.Module):
    """Registers its norms in the opposite order to the one its forward runs them in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_b = nn.Conv2d(4, 6, 1)
        self.bn_b = nn.BatchNorm2d(6)
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))


class Doubler(nn.Module):
    def forward(self, x):
        return torch.cat([x, x])


def test_registration_order_mismatch_raises_and_tracing_fixes_it():
    model = kalmannorm.convert_norm(Swapped(), "bkn", flow="execution", stat_batch_size=2)
    with pytest.raises(ChainOrderError, match="bn_a.*expects 'bn_b' right before it"):
        model(torch.randn(4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    traced = kalmannorm.convert_norm(
        Swapped(), "bkn", flow="execution", stat_batch_size=2, example_input=x
    )
    chain = kalmannorm.find_chain(traced)
    assert chain.names == ["bn_a", "bn_b"] and chain.order_source == "traced"
    assert traced.bn_b.transition.shape == (6, 4)
    assert chain.preceding == [traced.conv_a, traced.conv_b]
    traced(x).sum().backward()
    assert traced.bn_b.transition.grad is not None


def test_tracing_restores_buffers_and_leaves_running_stats_alone():
    model = conv_bn_stack(dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    kalmannorm.convert_norm(model, "bkn", flow="execution", example_input=torch.randn(4, 3, 3, 3))
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_calling_a_submodule_alone_in_training_is_refused():
    model = kalmannorm.convert_norm(conv_bn_stack(dtype=torch.float32), "bkn", flow="execution")
    tail = model[3:]
    with pytest.raises(ChainOrderError, match="ran after no Kalman layer"):
        tail(torch.randn(4, 4, 3, 3))


def test_nothing_outlives_a_pass():
    model = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn", flow="execution", stat_batch_size=2,
        check_finite=True,  # (opt-in) the third norm's error aborts the pass
    )  # fmt: skip
    model(torch.randn(4, 3, 3, 3))
    chain = kalmannorm.find_chain(model)
    assert chain._state.posterior is None and chain._state.index == -1
    # An aborted pass leaves state behind; the next forward of the model starts clean.
    bad = torch.randn(4, 3, 3, 3)
    bad[0, 0, 1, 1] = float("nan")
    model[6].weight.data[0, 0, 0, 0] = float("nan")  # the third norm sees NaN
    with pytest.raises(FloatingPointError):
        model(torch.randn(4, 3, 3, 3))
    assert chain._state.index == 1
    model[6].weight.data[0, 0, 0, 0] = 0.0
    model(torch.randn(4, 3, 3, 3))
    assert chain._state.posterior is None


def test_a_data_flow_drops_its_hand_over_when_its_last_layer_has_run():
    # Dropped inside the forward, not in the root's forward hook: under torch.compile(model) a
    # hand-over alive at the frame's end becomes graph outputs with zero-filled gradients.
    x = torch.randn(4, 3, 3, 3)
    model = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn-flow", stat_batch_size=2, example_input=x
    )
    chain = kalmannorm.find_chain(model)
    seen = []

    def before_the_chains_hook(*_):
        seen.append((chain._state.published, chain._state.memo, chain._state.complete))

    model.register_forward_hook(before_the_chains_hook, prepend=True)
    model(x)
    assert seen == [(None, None, True)]
    model(x)  # the next pass starts clean
    assert seen[-1] == (None, None, True) and not chain._state.complete


def test_a_data_flow_layer_run_after_the_whole_pass_is_refused():
    x = torch.randn(4, 3, 3, 3)
    model = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn-flow", stat_batch_size=2, example_input=x
    )
    hidden = model[3:6](model[:3](x))  # a pass in parts: its layer 0 starts it
    model[6:](hidden)  # its last layer completes it
    with pytest.raises(ChainOrderError, match="ran after every Kalman layer of the chain"):
        model[6:](hidden)
    model(x)  # a whole pass starts afresh


def test_a_data_flow_layer_called_on_its_own_in_a_fresh_pass_is_refused():
    # (it had no producer's statistics to predict from and silently normalised without a prior)
    x = torch.randn(4, 3, 3, 3)
    model = kalmannorm.convert_norm(
        conv_bn_stack(dtype=torch.float32), "bkn-flow", stat_batch_size=2, example_input=x
    )
    hidden = model[:3](x)
    model(x)  # a whole pass: the root's hooks leave no pass open
    with pytest.raises(ChainOrderError, match="which has not run in this forward pass. Run the"):
        model[3:](hidden)
    model.eval()
    model[3:](hidden)  # evaluated with moving statistics, it needs no prior
    model.train()
    model(x)


def test_two_models_have_separate_chains_and_do_not_interfere():
    first = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution", stat_batch_size=2)
    second = copy.deepcopy(first)
    randomize_kalman(first, seed=1)
    randomize_kalman(second, seed=1)
    assert kalmannorm.find_chain(first) is not kalmannorm.find_chain(second)
    assert kalmannorm.find_chain(second).layers[1] is second[4]
    x1, x2 = (
        torch.randn(4, 3, 3, 3, dtype=torch.float64),
        torch.randn(4, 3, 3, 3, dtype=torch.float64),
    )
    alone = first(x1)
    # Run the second model in the middle of the first model's pass.

    def run_second(*_):
        second(x2)

    handle = first[4].register_forward_pre_hook(run_second)
    interleaved = first(x1)
    handle.remove()
    torch.testing.assert_close(interleaved, alone)


def test_threads_do_not_share_pass_state():
    model = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution", stat_batch_size=2)
    randomize_kalman(model, seed=2)
    inputs = [torch.randn(4, 3, 3, 3, dtype=torch.float64) for _ in range(2)]
    expected = [model(x) for x in inputs]
    barrier = threading.Barrier(2, timeout=10)
    # Both threads stop inside the pass, after the first norm, before going on.

    def meet(*_):
        barrier.wait()

    model[4].register_forward_pre_hook(meet)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            results[i] = model(inputs[i])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        torch.testing.assert_close(results[i], expected[i])


def test_deepcopy_and_pickle_keep_a_working_chain():
    model = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution", stat_batch_size=2)
    randomize_kalman(model, seed=3)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (copy.deepcopy(model), loaded):
        chain = kalmannorm.find_chain(clone)
        assert all(a is b for a, b in zip(chain.layers, [clone[1], clone[4], clone[7]]))
        torch.testing.assert_close(clone(x), expected)


def test_eval_with_moving_statistics_tolerates_skipped_layers():
    """An auxiliary branch that only runs in training must not break evaluation."""

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn_stack((3, 4, 4), dtype=torch.float32)
            self.aux = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

        def forward(self, x):
            x = self.body(x)
            if self.training:
                x = x + self.aux(x)
            return self.head(x)

    model = kalmannorm.convert_norm(WithAux(), "bkn", flow="execution", stat_batch_size=2)
    model(torch.randn(4, 3, 3, 3))
    model.eval()
    assert model(torch.randn(4, 3, 3, 3)).shape == (4, 2, 3, 3)
    kalmannorm.set_eval_statistics(model, "batch")
    with pytest.raises(ChainOrderError, match="'head.1'"):
        model(torch.randn(4, 3, 3, 3))


def test_eval_layer_hands_moving_statistics_to_a_training_layer():
    model = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution", stat_batch_size=2)
    randomize_kalman(model, seed=4)
    model[1].eval()
    model(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    stats = model[4].last_statistics
    expected_prior = model[1].running_mean @ model[4].transition.detach().T
    torch.testing.assert_close(stats.prior_mean, expected_prior.expand(2, -1))


def test_statistics_group_mismatch_between_linked_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Doubler(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    kalmannorm.convert_norm(model, "bkn", flow="execution", stat_batch_size=2)
    with pytest.raises(ValueError, match="same batch split into the same statistics groups"):
        model(torch.randn(4, 3, 2, 2))


def test_a_layer_used_twice_per_pass_is_refused_when_traced():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    with pytest.raises(ValueError, match="runs more than once per forward pass"):
        kalmannorm.convert_norm(
            model, "bkn", flow="execution", example_input=torch.randn(4, 3, 2, 2)
        )


def test_relinking_keeps_learned_parameters_of_unchanged_width():
    model = kalmannorm.convert_norm(conv_bn_stack(), "bkn", flow="execution")
    randomize_kalman(model, seed=5)
    transition = model[4].transition.detach().clone()
    kalmannorm.link_chain(
        model, example_input=torch.randn(4, 3, 3, 3, dtype=torch.float64), flow="execution"
    )
    torch.testing.assert_close(model[4].transition.detach(), transition)
    assert len(model._forward_pre_hooks) == 1  # the old chain's hooks were removed
    assert "<- 1 (5 channels)" in kalmannorm.find_chain(model).describe()
