"""instrugo: the InstructGPT recipe (SFT, K-way reward model, PPO-ptx, iterated rounds), measurable on one CPU."""

import os

# PyTorch's CPU allocator asks for transparent huge pages on blocks of 2 MiB and more when this is set. It is
# read at the first tensor allocation, so it has to be set before torch is imported (stage processes inherit
# it). With it and `models.keep_freed_memory`, SFT and PPO steps fault in a tenth of the pages they did
# (docs/BENCHMARKS.md, "Huge pages and a heap without mmap"); THP_MEM_ALLOC_ENABLE=0 in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
