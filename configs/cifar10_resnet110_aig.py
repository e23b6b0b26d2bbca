"""ConvNet-AIG 110 on CIFAR-10, the reference recipe (paper: 5.76% error at t = 0.7).

Command (TFDS, after ``tfds build cifar10 --file_format=array_record``)::

    python train.py --config configs/cifar10_resnet110_aig.py --workdir workdirs/aig110

Or with CIFAR-10 as ``.npz`` shards in DIR::

    python train.py --config configs/cifar10_resnet110_aig.py --workdir workdirs/aig110 \\
        --config.dataset.source=npz --config.dataset.data_dir=DIR

349 epochs, batch 256, SGD 0.1 (×0.1 from the reference's epochs 150 and 250, which count from
1: after 149 and 249), weight decay 5e-4, λ = 2, every
block gated with target ``--config.target_rate`` (0.7; the reference script's default is 0.6).
Expected: about 5.8% test error (paper) on the original CIFAR-10, with about 82% of the
blocks executed (0.41 of 0.5 GMACs). Every 5 epochs the loop runs the evaluators of
``config.evals`` marked ``during_training`` (argmax and sampled gates);
``python eval.py --workdir workdirs/aig110`` runs all of them on the newest checkpoint.
"""

from configs import default


def get_config():
    """The ConvNet-AIG 110 recipe (all defaults)."""
    return default.get_config()
