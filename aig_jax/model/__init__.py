"""The gated ResNets: gates, blocks, the ResNet, its spec, target-rate schedules and costs."""

from aig_jax.model.blocks import BasicBlock, Bottleneck, ResidualBlock
from aig_jax.model.flops import ModelCost, model_cost
from aig_jax.model.gates import GATES, GateOutput, GumbelGate
from aig_jax.model.resnet import MODELS, ModelOutput, ResNet, build_model
from aig_jax.model.schedules import SCHEDULES, target_rates
from aig_jax.model.spec import ModelSpec
from aig_jax.model.variables import abstract_variables, init_variables

__all__ = [
    "GATES",
    "MODELS",
    "SCHEDULES",
    "BasicBlock",
    "Bottleneck",
    "GateOutput",
    "GumbelGate",
    "ModelCost",
    "ModelOutput",
    "ModelSpec",
    "ResNet",
    "ResidualBlock",
    "abstract_variables",
    "build_model",
    "init_variables",
    "model_cost",
    "target_rates",
]
