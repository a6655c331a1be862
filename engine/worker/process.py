"""Entry point of a tensor-parallel worker process (ranks 1..N-1).

Started by :func:`~metroline.engine.children.spawn_child`, so it dies with its parent
however the parent ends. The main thread serves commands from rank 0 until told to stop.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import traceback
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)


def limit_cpu_threads(world_size: int) -> None:
    """CPU tensor parallelism: share the cores among the ranks instead of oversubscribing."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def worker_main(
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    config: Any,
    commands: Connection,
    results: Connection,
) -> None:
    """Initialise rank ``rank``, build its model shard, then run rank 0's commands.

    Commands are pickled ``(method, args)`` tuples sent to every worker at once; a method's
    return value goes back on ``results`` as ``("ok", value)``, a failure as
    ``("error", traceback)`` after which the worker exits.
    """
    hang_dump = os.environ.get("METROLINE_HANG_DUMP_S")
    if hang_dump:  # debugging aid: print every thread's stack if a call hangs
        import faulthandler

        faulthandler.dump_traceback_later(float(hang_dump), repeat=True)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s")
    from ..distributed import destroy_distributed, init_distributed
    from ..long_lived_heap import freeze_long_lived_heap, thaw_long_lived_heap
    from .worker import Worker

    if backend == "gloo":
        limit_cpu_threads(world_size)
    worker = None
    try:
        results.send(("started", None))  # rank 0 joins the group only once every rank is up
        init_distributed(rank, world_size, backend, port)
        worker = Worker(config, rank=rank)
        results.send(("ok", None))
        timer = worker.host_timer
        while True:
            with timer.phase("worker.wait_for_plan"):
                data = commands.recv_bytes()
            with timer.phase("worker.unpickle"):
                method, args = pickle.loads(data)
            if method == "shutdown":
                break
            value = getattr(worker, method)(*args)
            if method == "initialize_cache":  # the pool and graphs: the last start-up step
                freeze_long_lived_heap()
            if method != "execute_model_async":  # rank 0 gathers nothing per step
                results.send(("ok", value))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        with contextlib.suppress(OSError):
            results.send(("error", traceback.format_exc()))
        raise
    finally:
        # CUDA graphs hold captured collectives: free them before the communicator goes.
        worker = None
        thaw_long_lived_heap()  # the frozen model may sit in reference cycles
        gc.collect()
        destroy_distributed()
