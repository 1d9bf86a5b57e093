"""A spawned process of tests/test_vllm_lifecycle.py: one gloo rank running the driver's shared run-dir check (a
module of its own so the child imports nothing else)."""

from __future__ import annotations


def check_dir(rank, world, init, roots, result):
    import torch.distributed as dist

    from sera_openrlhf.driver import check_shared_run_dir
    from sera_openrlhf.errors import ConfigError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        check_shared_run_dir(roots[rank], writer=rank == 0)
        result.put((rank, "ok"))
    except ConfigError as e:
        result.put((rank, str(e)))
    finally:
        dist.destroy_process_group()
