"""One data-parallel step on digits, run as: python ddp_worker.py RANK WORLD INIT_FILE OUT.safetensors [persistent].

WORLD = 1 runs without a process group (the single-process reference). With ``persistent``: persistent
particles, and a second batch that revisits half of the first one's examples in another order (so that
they move to another rank), saving the particles too.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from earlyprop.config import load_config
from earlyprop.data import load_dataset
from earlyprop.train import Trainer


def main(rank: int, world: int, init_file: str, out: str, persistent: bool) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    config = load_config(None, dict(rule="ep-symmetric", hidden=[16], free_steps=10, nudge_steps=4,
                                    batch_size=20, dtype="float64", epochs=1, persistent=persistent))
    trainer = Trainer(config, load_dataset("digits"), log=lambda _: None)
    order = torch.randperm(len(trainer.x_train), generator=trainer.generator)
    batch = order[:20]
    trainer.train_batch(batch)
    tensors = {k: v.contiguous() for k, v in trainer.network.state_dict().items()}
    if persistent:  # 10 examples seen before, at other positions (odd <-> even: another rank), and 9 new ones
        second = torch.cat([batch[0:10].flip(0), order[20:29]])  # position j <- old position 9 - j
        trainer.train_batch(second)
        tensors = {k: v.contiguous() for k, v in trainer.network.state_dict().items()}
        tensors.update({f"particles.{i}": p.contiguous() for i, p in enumerate(trainer.particles)})
    if rank == 0:
        save_file(tensors, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:] == ["persistent"])
