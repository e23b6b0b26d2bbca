"""One process of the two-process training test (run by tests/test_distributed.py).

    python tests/distributed_worker.py PROCESS_ID PORT WORKDIR [LATE_S]

Four CPU devices per process, gloo collectives, and the same small config as the single-process
run it is compared with. With ``LATE_S``, process 1 stands for a slower host: it finishes
compiling its first program ``LATE_S`` seconds late (gloo collectives wait only 30 s for a
peer, so the processes must not start a program before both have compiled it).
"""

import os
import sys
import time
import traceback

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax


def _compile_late(seconds: float) -> None:
    """Make this process's first ahead-of-time compilation finish ``seconds`` late."""
    compile_ = jax.stages.Lowered.compile
    done: list[bool] = []

    def late(self, *args, **kwargs):
        compiled = compile_(self, *args, **kwargs)
        if not done:
            done.append(True)
            print(f"compiled {seconds:g} s late", flush=True)
            time.sleep(seconds)
        return compiled

    jax.stages.Lowered.compile = late  # type: ignore[method-assign]


def main() -> None:
    process_id, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if process_id == 1 and len(sys.argv) > 4:
        _compile_late(float(sys.argv[4]))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4

    from aig_jax.train.loop import train_and_evaluate
    from tests.test_distributed import distributed_config

    try:
        results = train_and_evaluate(distributed_config(), workdir)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # at once: a normal exit would wait for the other process's shutdown
    print("top1_error", results["argmax"]["top1_error"], flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
