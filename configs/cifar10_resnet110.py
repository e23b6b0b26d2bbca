"""ResNet-110 on CIFAR-10 without gates: the baseline of ConvNet-AIG 110 (paper: 6.61% error).

Command::

    python train.py --config configs/cifar10_resnet110.py --workdir workdirs/resnet110

The same recipe as ``cifar10_resnet110_aig.py``; every block always executes (0.25 GMACs), so
every gate mode agrees and evaluation runs once, in argmax mode.
"""

from configs import default


def get_config():
    """The ConvNet-AIG 110 recipe with every block ungated."""
    c = default.get_config()
    c.target_schedule = "ungated"
    c.gate_rate_one_blocks = "drop"  # a plain ResNet: no gates at all
    return c
