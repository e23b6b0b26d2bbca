"""ConvNet-AIG 50 on ImageNet (paper, t = 0.5: 24.43% top-1 error at 2.71 GFLOPs).

Prepare once (needs TensorFlow: ``pip install -e .[prepare]``; the ImageNet archives must be in
the TFDS manual directory), then train::

    tfds build imagenet2012 --file_format=array_record --data_dir DATA
    python train.py --config configs/imagenet_resnet50_aig.py --workdir workdirs/aig50 \\
        --config.dataset.data_dir=DATA --config.target_rate=0.5

Batch 256, 99 epochs, SGD 0.1 (×0.1 every 30 of the reference's epochs, which count from 1:
after 29, 59 and 89), weight decay 1e-4, λ = 1, the
reference's schedule ``[1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, t, 1, 0.7, 1]``,
random-resized crop 224 + flip / resize 256 + centre crop 224.
"""

from configs import default


def get_config():
    """ConvNet-AIG 50 with the reference recipe."""
    c = default.get_config()
    c.model = "resnet50"
    c.target_schedule = "resnet50_reference"
    c.target_rate = 0.5
    c.target_weight = 1.0
    c.gate_lr_params = "gate"  # the reference ImageNet script's "fc*" parameters
    c.dataset.name = "imagenet2012"
    c.dataset.eval_split = "validation"
    c.dataset.num_classes = 1000
    c.dataset.image_size = 224
    c.dataset.preprocess = "imagenet"
    c.dataset.mean = default.IMAGENET_MEAN
    c.dataset.std = default.IMAGENET_STD
    c.num_epochs = 99.0  # the reference's range(1, 100): its epochs count from 1
    c.weight_decay = 1e-4
    c.lr_boundaries_epochs = (29, 59, 89)  # ×0.1 from its epochs 30, 60, 90 (epoch // 30)
    c.eval_batch_size = 400
    c.eval_every_epochs = 1.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2500
    c.data_threads = 32
    return c
