import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aig_jax.model.flops import model_cost
from aig_jax.model.resnet import build_model
from aig_jax.summary import main as summary_main


@pytest.mark.parametrize(
    ("name", "size", "gmacs", "mparams"),
    [
        ("resnet50", 224, 4.1, 25.56),
        ("resnet101", 224, 7.8, 44.5),
        ("resnet110_cifar", 32, 0.253, 1.73),
    ],
)
def test_ungated_costs_match_published_figures(name, size, gmacs, mparams):
    cost = model_cost(build_model(name, gated=False), size)
    assert cost.macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert cost.params / 1e6 == pytest.approx(mparams, rel=0.02)
    assert cost.gate_params == 0


def test_analytic_params_equal_the_initialised_model():
    model = build_model("resnet50", gated=[i % 2 == 0 for i in range(16)], num_classes=17)
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)))
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert model_cost(model, 64).params == n


@pytest.mark.parametrize(("name", "size"), [("resnet20_cifar", 32), ("resnet18", 64)])
def test_analytic_macs_agree_with_xla_cost_analysis(name, size):
    model = build_model(name, gated=False, num_classes=10)
    x = jnp.zeros((1, size, size, 3))
    variables = model.init({"params": jax.random.key(0)}, x)
    compiled = jax.jit(lambda v, x: model.apply(v, x).logits).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    xla_macs = analysis["flops"] / 2  # XLA counts a multiply-add as two flops
    # XLA counts only the taps inside the image, plus BatchNorm, ReLU and additions (~1%).
    analytic = model_cost(model, size, skip_padding=True).macs
    assert analytic == pytest.approx(xla_macs, rel=0.03)
    assert xla_macs >= analytic
    assert model_cost(model, size).macs > analytic  # the convention counts padded taps


def test_realised_macs_sum_the_executed_branches():
    model = build_model("resnet8_cifar")
    cost = model_cost(model, 32)
    gates = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1]], np.float32)  # [L=3, B=3]
    branch = [b.branch_macs for b in cost.blocks]
    everything = cost.macs
    expected = [everything - branch[1], everything - branch[0] - branch[1], everything]
    np.testing.assert_allclose(cost.realised_macs(gates), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"gates must be \[3, B\]"):
        cost.realised_macs(gates[:2])


def test_summary_cli_json(capsys):
    assert summary_main(["resnet110_cifar", "--gated", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 1_766_630 and data["gate_params"] == 35_916
    assert len(data["blocks"]) == 54 and all(b["gated"] for b in data["blocks"])
    assert data["macs"] == pytest.approx(253e6, rel=0.01)


def test_summary_cli_table_and_errors(capsys):
    assert summary_main(["resnet50", "--schedule", "resnet50_reference", "--t", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "stage4_block2" in out and "25,768,264 params" in out  # rate-1 gates kept
    argv = ["resnet50", "--schedule", "resnet50_reference", "--t", "0.5"]
    argv += ["--gate-rate-one-blocks", "drop"]
    assert summary_main(argv) == 0
    assert "25,701,212 params" in capsys.readouterr().out
    assert summary_main(["resnet50", "--json"]) == 0  # no rate below 1: a plain ResNet
    assert json.loads(capsys.readouterr().out)["gate_params"] == 0
    assert summary_main(["resnet50", "--target-rates", "0.5", "0.5"]) == 2
    assert "target-rate list has 2 entries but the model has 16 blocks" in capsys.readouterr().err
