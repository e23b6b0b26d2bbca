"""ResNet-50 on ImageNet without gates: the baseline (paper: 23.88% top-1 error, 3.8 GFLOPs).

Command (see ``imagenet_resnet50_aig.py`` for preparing the data)::

    python train.py --config configs/imagenet_resnet50.py --workdir workdirs/resnet50 \\
        --config.dataset.data_dir=DATA

Every block always executes, so evaluation runs once, in argmax mode.
"""

from configs import imagenet_resnet50_aig


def get_config():
    """The ConvNet-AIG 50 recipe with every block ungated."""
    c = imagenet_resnet50_aig.get_config()
    c.target_schedule = "ungated"
    c.gate_rate_one_blocks = "drop"  # a plain ResNet: no gates at all
    return c
