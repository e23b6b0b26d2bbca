"""Defaults shared by every config: the reference CIFAR-10 recipe with ConvNet-AIG 110.

Other configs import ``get_config`` from here and override a few fields; any field can also be
overridden on the command line, e.g. ``--config.target_rate=0.5`` or
``--config.evals.open.during_training=True``.
"""

import ml_collections
from ml_collections import config_dict

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config() -> ml_collections.ConfigDict:
    """The reference CIFAR-10 recipe: ResNet-110, every block gated with target 0.7, λ = 2."""
    c = ml_collections.ConfigDict()
    # Model: a registry name, its gates and the per-block target execution rates.
    c.model = "resnet110_cifar"
    c.gate = "gumbel"
    c.gate_options = ml_collections.ConfigDict()  # e.g. {"tau": 1.0}: Gumbel temperature
    c.dtype = "float32"  # or "bfloat16" compute (parameters stay float32)
    c.target_schedule = "uniform"  # a name from aig_jax.model.schedules.SCHEDULES
    c.target_rate = 0.7  # t of the schedule
    c.target_rates = config_dict.placeholder(tuple)  # explicit per-block rates win if set
    c.target_weight = 2.0  # λ of the target-rate loss
    c.target_loss_normalize = "gated"  # divide by gated layers ("all": the reference ImageNet)
    # Blocks of target rate 1 "keep" their gate, trained by the cross-entropy alone (the
    # reference), or "drop" it and always execute (no gate parameters).
    c.gate_rate_one_blocks = "keep"
    # "reference": the reference code's initialisation (PyTorch 0.3.1's defaults with γ ~ U(0, 1)
    # for CIFAR models, He-normal convolutions with γ = 1 for ImageNet ones); or "he_normal".
    c.init = "reference"

    c.dataset = ml_collections.ConfigDict(
        {
            "source": "tfds",  # tfds | npz | synthetic | digits (aig_jax.data.SOURCES)
            "name": "cifar10",
            "data_dir": config_dict.placeholder(str),
            "train_split": "train",
            "eval_split": "test",
            "num_classes": 10,
            "image_size": 32,
            "preprocess": "cifar",  # cifar | imagenet | none
            "crop_padding": 4,
            "flip": True,
            "mean": CIFAR_MEAN,
            "std": CIFAR_STD,
            "num_examples": config_dict.placeholder(int),  # synthetic source only
        }
    )

    # Optimisation: PyTorch-style SGD, weight decay on every parameter.
    c.batch_size = 256  # global, over all devices and hosts
    c.eval_batch_size = 512
    c.num_epochs = 349.0  # the reference's range(1, 350): its epochs count from 1
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4
    c.lr_boundaries_epochs = (149, 249)  # ×0.1 from the reference's epochs 150 and 250
    c.lr_decay = 0.1
    c.warmup_epochs = 0.0
    c.gate_lr_factor = 1.0  # the reference's --lrfact
    c.gate_lr_params = "fc2"  # which gate parameters get it: fc2 | gate | none
    c.on_nonfinite = "stop"  # a NaN/inf loss or gradient: stop | skip_step (keep the state)

    # Bookkeeping.
    c.seed = 0
    c.num_devices = 0  # 0: all devices
    c.data_threads = 8
    c.log_every_steps = 50
    c.eval_every_epochs = 5.0
    c.eval_limit = config_dict.placeholder(int)  # evaluate only the first N examples
    # Evaluators by name: "type" is one of aig_jax.eval.suite.EVALUATORS, the other keys are its
    # options (see that module). The training loop runs those "during_training" every
    # eval_every_epochs; eval.py runs them all (its flags override them). "calibration" fits the
    # thresholds of the calibrated mode whenever an evaluator uses it.
    c.evals = ml_collections.ConfigDict(
        {
            "argmax": {"type": "classification", "mode": "argmax", "during_training": True},
            "sample": {"type": "classification", "mode": "sample", "during_training": True},
            "open": {"type": "classification", "mode": "open", "during_training": False},
            "calibrated": {
                "type": "classification",
                "mode": "calibrated",
                "during_training": False,
            },
            "calibration": {"type": "calibration", "limit": 10_000},
            "gates": {"type": "gate_statistics", "during_training": False},  # per-class plots
        }
    )
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.init_from = config_dict.placeholder(str)  # a checkpoint to start from (not resume)
    c.tensorboard = True
    c.progress = True
    return c
