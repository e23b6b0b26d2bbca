"""aig-jax: Convolutional Networks with Adaptive Inference Graphs (ConvNet-AIG) in JAX/Flax."""

from aig_jax.flops import model_cost
from aig_jax.gates import GATES, GumbelGate, straight_through_gumbel
from aig_jax.losses import target_rate_loss
from aig_jax.models import MODELS, ModelOutput, ResNet, build_model
from aig_jax.schedules import SCHEDULES, target_rates

__version__ = "0.1.0"

__all__ = [
    "GATES",
    "MODELS",
    "SCHEDULES",
    "GumbelGate",
    "ModelOutput",
    "ResNet",
    "build_model",
    "model_cost",
    "straight_through_gumbel",
    "target_rate_loss",
    "target_rates",
]
