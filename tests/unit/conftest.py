"""Unit tests: pure code, tiny tensors.

One intra-op thread: for models this small extra OpenMP threads only add overhead, and on a busy
2-core machine their spin-waiting made single tests swing from 0.3 s to 15 s.
"""

import torch

torch.set_num_threads(1)
