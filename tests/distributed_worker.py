"""One process of the two-process training test (run by tests/test_distributed.py).

    python tests/distributed_worker.py PROCESS_ID PORT WORKDIR

Four CPU devices per process, gloo collectives, and the same small config as the single-process
run it is compared with.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax


def main() -> None:
    process_id, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    from aig_jax.trainer import train_and_evaluate
    from tests.test_distributed import distributed_config

    results = train_and_evaluate(distributed_config(), workdir)
    print("top1_error", results["argmax"]["top1_error"], flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
