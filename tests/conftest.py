"""Suite-wide settings: one intra-op thread, since the tests use small tensors and this project's
machines have 2 shared cores (two threads oversubscribe and can be many times slower)."""

import torch

torch.set_num_threads(1)
