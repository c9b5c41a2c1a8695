"""instrugo: the InstructGPT recipe (SFT, K-way reward model, PPO-ptx, iterated rounds), measurable on one CPU."""

__version__ = "0.1.0"
