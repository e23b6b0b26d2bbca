"""Extension points, exercised the way a research fork uses them: from outside the package.

This module defines its own gate, backbone, target-rate schedule, dataset source and evaluator,
registers each by name, and selects them from a config. The cheap tests check each one in
isolation; one end-to-end test trains a step through ``train_and_evaluate`` with all at once.
"""

import configparser
import functools
import math
import os
import threading
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aig_jax
from aig_jax import checkpoint
from aig_jax.data import SOURCES, make_source, train_iterator
from aig_jax.eval.suite import EVALUATORS
from aig_jax.model.blocks import ConvSpec, ModuleDef, ResidualBlock
from aig_jax.model.flops import model_cost
from aig_jax.model.gates import GATES, GateOutput, check_gate_mode, straight_through_threshold
from aig_jax.model.resnet import MODELS, build_model, resnet
from aig_jax.model.schedules import SCHEDULES
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import init_variables
from aig_jax.train.loop import train_and_evaluate
from aig_jax.train.metrics import read_metrics
from configs import tiny

# --- a gate: one sigmoid score, Bernoulli sample with the straight-through estimator ----------


class SigmoidGate(nn.Module):
    """avg-pool → Dense(hidden) → ReLU → Dense(1) → sigmoid; decision ``u < p`` when sampling.

    It does not normalise, so it ignores the model's ``norm``.
    """

    norm: ModuleDef | None = None
    hidden: int = 4

    def cost(self, in_features: int) -> tuple[int, int]:
        macs = in_features * self.hidden + self.hidden
        params = (in_features * self.hidden + self.hidden) + (self.hidden + 1)
        return macs, params

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        mode: str,
        threshold: jax.Array | float = 0.5,
    ) -> GateOutput:
        del train
        check_gate_mode(mode)
        w = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        w = nn.relu(nn.Dense(self.hidden, name="hidden")(w))
        score = nn.Dense(1, bias_init=nn.initializers.constant(1.0), name="score")(w)[:, 0]
        prob = jax.nn.sigmoid(score)
        if mode == "sample":
            u = jax.random.uniform(self.make_rng("gumbel"), prob.shape)
            decision = straight_through_threshold(prob, u)  # 1 with probability p
        elif mode == "open":
            decision = jnp.ones_like(prob)
        else:
            decision = straight_through_threshold(prob, 0.5 if mode == "argmax" else threshold)
        return GateOutput(decision, prob)


# --- a backbone: ResNeXt-style grouped bottleneck blocks in the CIFAR layout ------------------


class GroupedBottleneck(ResidualBlock):
    """1×1 → grouped 3×3/s (4 groups) → 1×1 (×2 wide)."""

    expansion: ClassVar[int] = 2
    groups: ClassVar[int] = 4

    @classmethod
    def conv_specs(cls, in_features: int, features: int, strides: int) -> tuple[ConvSpec, ...]:
        return (
            ConvSpec(1, in_features, features, 1, "branch"),
            ConvSpec(3, features, features, strides, "branch", groups=cls.groups),
            ConvSpec(1, features, features * cls.expansion, 1, "branch"),
            *cls.projection_spec(in_features, features, strides),
        )

    def branch(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, (1, 1), name="conv1")(x)))
        y = self.conv(
            self.features,
            (3, 3),
            self.strides,
            padding=1,
            feature_group_count=self.groups,
            name="conv2",
        )(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features * self.expansion, (1, 1), name="conv3")(y)
        return self.norm(name="bn3")(y)


# --- a target-rate schedule: from t at the first block up to 1 (ungated) at the last ----------


def ramp(num_blocks: int, t: float) -> list[float]:
    return [t + (1.0 - t) * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


# --- a dataset source: in-memory images that remember which examples were read ---------------


class CountingSource:
    """``size`` images with pixel value ``(7 i) mod 256`` and label ``i mod 10``."""

    def __init__(self, size: int, image_size: int) -> None:
        self.num_classes = 10
        self.images = (
            np.arange(size, dtype=np.int64)[:, None, None, None] * 7 % 256
            + np.zeros((1, image_size, image_size, 3), np.int64)
        ).astype(np.uint8)
        self.labels = (np.arange(size) % 10).astype(np.int32)
        self.read_indices: list[int] = []
        self._lock = threading.Lock()  # the loaders read from several threads

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            self.read_indices.extend(int(i) for i in indices)
        return self.images[indices], self.labels[indices]


SPLIT_SIZES = {"train": 40, "test": 24}
OPENED: dict[str, list[CountingSource]] = {"train": [], "test": []}


def counting_source(dataset_cfg: Any, split: str) -> CountingSource:
    if split not in SPLIT_SIZES:
        raise ValueError(f"counting source has splits {sorted(SPLIT_SIZES)}, got {split!r}")
    source = CountingSource(SPLIT_SIZES[split], dataset_cfg.image_size)
    OPENED[split].append(source)
    return source


class Confidence:
    """An evaluator: the mean top-1 softmax probability over the evaluation split."""

    def __init__(self, ctx: Any, mode: str = "argmax") -> None:
        self.ctx, self.mode = ctx, mode

    def run(self, variables: Any) -> dict[str, Any]:
        preds = self.ctx.predict(variables, self.mode)
        return {
            "gate_mode": self.mode,
            "examples": len(preds.labels),
            "mean": preds.confidence.mean(),
        }


# --- registration: what a fork's own module does at import time --------------------------------

GATES.register("sigmoid_test", SigmoidGate, overwrite=True)
MODELS.register(
    "resnext8_test",
    functools.partial(
        resnet, stage_sizes=(1, 1, 1), block_cls=GroupedBottleneck, widths=(8, 16, 32), stem="cifar"
    ),
    overwrite=True,
)
SCHEDULES.register("ramp_test", ramp, overwrite=True)
SOURCES.register("counting_test", counting_source, overwrite=True)
EVALUATORS.register("confidence_test", Confidence, overwrite=True)

IMAGE_SIZE = 8


def fork_config():
    """The tiny config switched to every extension above, shrunk to one training step."""
    c = tiny.get_config()
    c.model = "resnext8_test"
    c.gate = "sigmoid_test"
    c.gate_options = {"hidden": 4}
    c.target_schedule = "ramp_test"
    c.target_rate = 0.4
    c.gate_rate_one_blocks = "drop"  # the ramp's last block (rate 1) has no gate
    c.dataset.source = "counting_test"
    c.dataset.image_size = IMAGE_SIZE
    c.dataset.crop_padding = 1
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_train_steps = 1
    c.log_every_steps = 1
    c.eval_every_epochs = 1000.0
    c.evals.sample.during_training = False
    c.evals.confidence = {"type": "confidence_test", "mode": "open"}
    c.num_devices = 2  # sharded, as on a multi-device host, but cheap to compile on a CPU
    c.data_threads = 1
    c.progress = False
    c.tensorboard = False
    return c


def param_count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def test_custom_gate_decides_by_mode_and_declares_its_cost():
    gate = SigmoidGate(hidden=4)
    x = jax.random.normal(jax.random.key(0), (6, 2, 2, 16))
    variables = gate.init(jax.random.key(1), x, train=False, mode="argmax")
    assert variables["params"]["score"]["kernel"].shape == (4, 1)
    apply = functools.partial(gate.apply, variables, x, train=True)
    argmax = apply(mode="argmax")
    np.testing.assert_array_equal(argmax.decision, (argmax.prob > 0.5).astype(np.float32))
    np.testing.assert_array_equal(apply(mode="calibrated", threshold=1.0).decision, [0] * 6)
    np.testing.assert_array_equal(apply(mode="open").decision, [1] * 6)
    # Sampling is Bernoulli(p): forcing p to 1 or 0 through the bias fixes every decision.
    for bias, expected in ((50.0, 1.0), (-50.0, 0.0)):
        params = variables["params"]
        forced = {"params": {**params, "score": {**params["score"], "bias": jnp.array([bias])}}}
        rngs = {"gumbel": jax.random.key(2)}
        sample = gate.apply(forced, x, train=True, mode="sample", rngs=rngs)
        np.testing.assert_array_equal(sample.decision, [expected] * 6)
    with pytest.raises(ValueError, match="'soft'"):
        apply(mode="soft")
    # The cost model asks the gate: its parameter count must match the initialised gate.
    assert gate.cost(16)[1] == param_count(variables["params"])
    model = build_model("resnet8_cifar", gate="sigmoid_test", gate_options={"hidden": 4})
    cost = model_cost(model, IMAGE_SIZE)
    assert [b.gate_macs for b in cost.blocks] == [16 * 4 + 4, 16 * 4 + 4, 32 * 4 + 4]


def test_custom_backbone_counts_grouped_convolutions():
    model = build_model("resnext8_test", num_classes=10, gated=(True, True, False))
    image_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    variables = jax.eval_shape(lambda: init_variables(model, image_shape, seed=0))
    block = variables["params"]["stage1_block0"]
    assert block["conv2"]["kernel"].shape == (3, 3, 8 // 4, 8)  # grouped: 2 inputs per output
    cost = model_cost(model, IMAGE_SIZE)
    assert cost.params == param_count(variables["params"])
    # Block 0 on 8×8: conv1 64·8·8 + grouped conv2 64·9·2·8 + conv3 64·8·16 MACs.
    assert cost.blocks[0].branch_macs == 64 * 8 * 8 + 64 * 9 * 2 * 8 + 64 * 8 * 16
    assert (cost.blocks[2].gated, cost.blocks[2].gate_macs) == (False, 0)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *image_shape))), variables)
    assert out.logits.shape == (2, 10) and out.gates.shape == (3, 2)


def test_custom_schedule_sets_rates_and_gated_blocks():
    spec = ModelSpec.from_config(fork_config())
    np.testing.assert_allclose(spec.rates, [0.4, 0.7, 1.0])
    assert spec.gated == (True, True, False)


def test_custom_source_feeds_the_train_iterator():
    cfg = fork_config().dataset
    source = make_source(cfg, "train")
    assert isinstance(source, CountingSource)
    batch = next(train_iterator(source, cfg, global_batch=8, seed=0, num_steps=1, num_threads=1))
    read = np.array(source.read_indices)
    assert len(set(read)) == 8 and read.min() >= 0 and read.max() < 40
    np.testing.assert_array_equal(batch["label"], read % 10)
    with pytest.raises(ValueError, match="'validation'"):
        make_source(cfg, "validation")


def test_fork_trains_one_step_with_all_extensions(tmp_path):
    config = fork_config()
    n_train, n_test = len(OPENED["train"]), len(OPENED["test"])
    results = train_and_evaluate(config, str(tmp_path))

    # The source: the step read one batch of distinct training examples; each of the two
    # evaluators (argmax, confidence) read every test example once.
    (train_source,) = OPENED["train"][n_train:]
    (test_source,) = OPENED["test"][n_test:]
    assert len(set(train_source.read_indices)) == 16
    assert sorted(test_source.read_indices) == sorted(2 * list(range(SPLIT_SIZES["test"])))
    assert results["argmax"]["num_examples"] == SPLIT_SIZES["test"]
    # The evaluator: run by the loop with its options from the config, and logged.
    assert results["confidence"]["examples"] == SPLIT_SIZES["test"]
    assert results["confidence"]["gate_mode"] == "open" and 0 < results["confidence"]["mean"] <= 1
    (logged,) = [r for r in read_metrics(str(tmp_path), "eval") if r["evaluator"] == "confidence"]
    assert logged["mean"] == pytest.approx(float(results["confidence"]["mean"]))

    # The schedule: the checkpoint records its rates and the loss pulled towards them.
    meta, directory, step = checkpoint.read_meta(str(tmp_path))
    assert (meta["model"]["name"], meta["model"]["gate"], step) == (
        "resnext8_test",
        "sigmoid_test",
        1,
    )
    np.testing.assert_allclose(meta["model"]["rates"], [0.4, 0.7, 1.0])
    (train,) = read_metrics(str(tmp_path), "train")
    rates = np.array(train["gate_rates"])
    assert rates[2] == 1.0  # the ungated block always executes
    expected = np.mean((rates[:2] - np.array([0.4, 0.7])) ** 2)
    np.testing.assert_allclose(train["target_loss"], expected, rtol=1e-5)

    # The gate and the backbone: their parameters are in the checkpoint, and were trained.
    spec = ModelSpec.from_json(meta["model"])
    model = spec.build()
    initial = init_variables(model, (IMAGE_SIZE, IMAGE_SIZE, 3), config.seed)
    restored = checkpoint.load_variables(directory, step, initial)["params"]
    gate = restored["stage1_block0"]["gate"]
    assert gate["score"]["kernel"].shape == (4, 1)
    assert "gate" not in restored["stage3_block0"]
    assert restored["stage2_block0"]["conv2"]["kernel"].shape == (3, 3, 16 // 4, 16)
    initial_gate = initial["params"]["stage1_block0"]["gate"]
    assert not np.allclose(gate["score"]["kernel"], initial_gate["score"]["kernel"])
    cost = model_cost(model, IMAGE_SIZE)
    assert results["argmax"]["full_gmacs"] == pytest.approx(cost.macs / 1e9)


def test_version_matches_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    assert aig_jax.__version__ == parser.get("metadata", "version")
