"""ConvNet-AIG 101 on ImageNet (paper, t = 0.5: 22.64% top-1 error at 5.10 GFLOPs).

Command (see ``imagenet_resnet50_aig.py`` for preparing the data)::

    python train.py --config configs/imagenet_resnet101_aig.py --workdir workdirs/aig101 \\
        --config.dataset.data_dir=DATA --config.target_rate=0.5

The ResNet-50 recipe with the reference's ResNet-101 schedule: eight blocks of target rate 1
(their gates kept, as the reference does), then t.
"""

from configs import imagenet_resnet50_aig


def get_config():
    """ConvNet-AIG 101 with the reference recipe."""
    c = imagenet_resnet50_aig.get_config()
    c.model = "resnet101"
    c.target_schedule = "resnet101_reference"
    return c
