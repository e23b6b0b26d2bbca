"""Turn the official CIFAR-10 python archive into ``.npz`` shards for the ``npz`` source.

    python -m aig_jax.data.cifar_archive cifar-10-python.tar.gz data/cifar10

writes ``cifar10_train_00.npz`` … ``cifar10_train_04.npz`` (10,000 images each, original order)
and ``cifar10_test.npz``, each with ``image`` uint8 [N, 32, 32, 3] and ``label`` uint8 [N].
The archive is the one distributed at the CIFAR-10 home page (``cifar-10-python.tar.gz``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import tarfile

import numpy as np

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def read_batch(archive: tarfile.TarFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 3] and labels uint8 [N] of one pickled batch in ``archive``."""
    where = os.fsdecode(archive.name or "the archive")
    member = next((m for m in archive.getmembers() if os.path.basename(m.name) == name), None)
    if member is None:
        raise FileNotFoundError(f"{name!r} is not in {where}: not a CIFAR-10 python archive")
    handle = archive.extractfile(member)
    if handle is None:
        raise FileNotFoundError(f"{member.name!r} in {where} is not a regular file")
    batch = pickle.load(handle, encoding="bytes")
    images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], np.uint8)


def convert(archive_path: str, out_dir: str) -> list[str]:
    """Write the train and test shards of ``archive_path`` into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with tarfile.open(archive_path, "r:gz") as archive:
        jobs = [(f"cifar10_train_{i:02d}.npz", b) for i, b in enumerate(TRAIN_BATCHES)]
        for filename, batch in [*jobs, ("cifar10_test.npz", TEST_BATCH)]:
            images, labels = read_batch(archive, batch)
            path = os.path.join(out_dir, filename)
            np.savez(path, image=images, label=labels)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", help="cifar-10-python.tar.gz")
    parser.add_argument("out_dir", help="directory for the .npz shards")
    args = parser.parse_args()
    for path in convert(args.archive, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
