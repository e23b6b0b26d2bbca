"""aig-jax: Convolutional Networks with Adaptive Inference Graphs (ConvNet-AIG) in JAX/Flax."""

import configparser
import importlib.metadata
import os

from aig_jax.model import (
    GATES,
    MODELS,
    SCHEDULES,
    GumbelGate,
    ModelOutput,
    ModelSpec,
    ResNet,
    build_model,
    model_cost,
    target_rates,
)
from aig_jax.model.gates import straight_through_gumbel
from aig_jax.train.losses import target_rate_loss


def _version() -> str:
    """The installed distribution's version, else the one in a source checkout's setup.cfg."""
    try:
        return importlib.metadata.version("aig-jax")
    except importlib.metadata.PackageNotFoundError:
        setup_cfg = os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.cfg")
        parser = configparser.ConfigParser()
        parser.read(setup_cfg)
        return parser.get("metadata", "version", fallback="0+unknown")


__version__ = _version()

__all__ = [
    "GATES",
    "MODELS",
    "SCHEDULES",
    "GumbelGate",
    "ModelOutput",
    "ModelSpec",
    "ResNet",
    "build_model",
    "model_cost",
    "straight_through_gumbel",
    "target_rate_loss",
    "target_rates",
]
