"""torch.compile with fullgraph=True, and low-precision autocast with float32 statistics."""

import copy
import operator

import pytest
import torch

import kalmannorm
from kalmannorm import moments as mo
from kalmannorm.lab.models import SmallCNN


@pytest.mark.parametrize(
    ("norm", "options"), [("bkn", {"stat_batch_size": 2}), ("gkn", {"num_groups": 4})]
)
def test_compiled_kalman_model_has_no_graph_breaks_and_matches_eager(norm, options):
    """The compiled composite path against the eager fused one."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    # the data flow is traced eagerly, on example_input, before compiling
    model = kalmannorm.convert_norm(SmallCNN(3, 10, 8), norm, example_input=x, **options)
    twin = copy.deepcopy(model)
    expected = model(x)
    expected.sum().backward()
    compiled = torch.compile(twin, fullgraph=True)  # raises on any graph break
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    layer, twin_layer = model.features[3][1], twin.features[3][1]
    if norm == "bkn":
        torch.testing.assert_close(twin_layer.running_var, layer.running_var)
    stats = twin_layer.last_statistics
    assert stats.gain.shape == stats.batch_mean.shape == layer.last_statistics.batch_mean.shape
    torch.testing.assert_close(stats.posterior_var, layer.last_statistics.posterior_var)


def test_bfloat16_autocast_accumulates_statistics_in_float32():
    torch.manual_seed(0)
    model = kalmannorm.convert_norm(SmallCNN(3, 10, 8), "bkn", stat_batch_size=2)
    reference = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    stats = model.features[1][1].last_statistics
    assert stats.batch_var.dtype == torch.float32 and stats.posterior_var.dtype == torch.float32
    assert model.features[1][1].running_var.dtype == torch.float32
    expected = reference(x.double())
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)
    exact = reference.features[1][1].last_statistics.posterior_var
    torch.testing.assert_close(stats.posterior_var.double(), exact, rtol=0.03, atol=1e-3)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class _Stem(torch.nn.Module):
    """ResNet's stem and one residual block: a max pool after a ReLU, then an addition."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))  # fmt: skip
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.branch(x))).mean((2, 3))


def test_the_compiled_dense_rule_contracts_channels_on_a_gpu_with_few_statistics_groups():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # CUDA tensors without a GPU
        assert mo.contracts_channels(torch.empty(mo.FEW_GROUPS, 4, device="cuda"))
        assert not mo.contracts_channels(torch.empty(mo.FEW_GROUPS + 1, 4, device="cuda"))
    assert not mo.contracts_channels(torch.empty(2, 4))  # a CPU keeps the matrix products


_MATRIX_PRODUCTS = {torch.mm, torch.bmm, torch.matmul, torch.einsum, operator.matmul}


@pytest.mark.parametrize("gpu_form", [False, True], ids=["cpu-form", "gpu-form"])
def test_compiled_data_flow_with_max_pool_and_addition_has_no_graph_breaks(gpu_form, monkeypatch):
    """Compiled against eager, in both forms of the dense moment rules: matrix products (the
    CPU's) and, as on a GPU at few statistics groups, contractions by elementwise products and
    sums, which leave no matrix product in the graph at all."""
    if gpu_form:
        monkeypatch.setattr(mo, "CONTRACTING_DEVICES", mo.CONTRACTING_DEVICES | {"cpu"})
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    model = kalmannorm.convert_norm(_Stem(), "bkn-flow", stat_batch_size=2, example_input=x)
    twin = copy.deepcopy(model)
    expected = model(x)
    expected.square().sum().backward()
    graphs = []

    def inductor_after_capture(gm, example_inputs):
        graphs.append(gm)
        return torch._inductor.compile(gm, example_inputs)

    torch._dynamo.reset()  # the form is chosen when the graph is traced
    compiled = torch.compile(twin, backend=inductor_after_capture, fullgraph=True)  # no breaks
    out = compiled(x)
    called = {node.target for graph in graphs for node in graph.graph.nodes}
    assert bool(called & _MATRIX_PRODUCTS) != gpu_form
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # the compiled formulas' gradients (the 1x1 head's one batched product among them)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    layer = model.branch[1]
    assert layer.last_statistics.prior_mean is not None  # the pool's moments fed a prior


def test_compiled_data_flow_returns_no_graph_output_but_the_model_s_that_needs_a_gradient():
    # A tensor the frame leaves alive (say the chain's hand-over, if dropped only by the root's
    # forward hook, which runs after the frame) is a graph output; one that needs a gradient
    # and is not used gets a zero-filled gradient in every backward (a kernel launch each).
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    model = kalmannorm.convert_norm(_Stem(), "bkn-flow", stat_batch_size=2, example_input=x)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(x)
    (graph,) = graphs
    (output,) = [node for node in graph.graph.nodes if node.op == "output"]
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output.args, nodes.append)
    values = [node.meta["example_value"] for node in nodes]
    assert len(values) > 1  # the layers' detached diagnostics are outputs too
    assert [v.requires_grad for v in values].count(True) == 1
