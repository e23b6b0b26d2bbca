"""A ConvNet-AIG 8 on scikit-learn's bundled handwritten digits: real training in about a minute.

Command (offline; scikit-learn ships the data)::

    python train.py --config configs/tiny.py --workdir workdirs/tiny

1,437 training and 360 test images (8×8, upsampled to 16×16), every block gated with target
0.6, 15 epochs at batch 64. It is the end-to-end smoke test of the whole pipeline and the demo
of the README; expect a test error of a few percent with about 60% of the blocks executed.
The loop evaluates argmax and sampled gates at epochs 5, 10 and 15 (``config.evals``);
``python eval.py --workdir workdirs/tiny`` then runs every evaluator of the list.
"""

from configs import default


def get_config():
    """ResNet-8 (CIFAR layout), every block gated at t = 0.6, on the digits source."""
    c = default.get_config()
    c.model = "resnet8_cifar"
    c.target_rate = 0.6
    c.dataset.source = "digits"
    c.dataset.name = "digits"
    c.dataset.image_size = 16
    c.dataset.crop_padding = 2
    c.dataset.flip = False  # digits are not mirror-symmetric
    c.dataset.mean = (0.2, 0.2, 0.2)
    c.dataset.std = (0.33, 0.33, 0.33)
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 15.0
    c.lr_boundaries_epochs = (10, 13)
    c.weight_decay = 1e-4
    c.log_every_steps = 20
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 100
    c.data_threads = 2
    return c
