"""One data-parallel step on digits, run as: python ddp_worker.py RANK WORLD INIT_FILE OUT.safetensors.

WORLD = 1 runs without a process group (the single-process reference).
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from earlyprop.config import load_config
from earlyprop.data import load_dataset
from earlyprop.train import Trainer


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    config = load_config(None, dict(rule="ep-symmetric", hidden=[16], free_steps=10, nudge_steps=4,
                                    batch_size=20, dtype="float64", epochs=1))
    trainer = Trainer(config, load_dataset("digits"), log=lambda _: None)
    batch = torch.randperm(len(trainer.x_train), generator=trainer.generator)[:20]
    trainer.train_batch(batch)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.network.state_dict().items()}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
