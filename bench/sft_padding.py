"""How much padding SFT's micro-batches carry on a dataset, with each step's examples in shuffled order and
sorted by length (what `instrugo sft` does): token positions computed against real tokens.
Usage: .venv/bin/python bench/sft_padding.py [--data D] [--max-length N] [--batch-size N] [--micro-batch-size N]
(defaults: the demo's SFT settings)."""
import argparse
import math

from instrugo import models
from instrugo.data import load_examples
from instrugo.sft import step_indices, tokenize_example


def positions(lengths: list[int], micro: int) -> int:
    """Token positions of micro-batches of `micro` examples, each padded to its longest."""
    return sum(max(lengths[i:i + micro]) * len(lengths[i:i + micro]) for i in range(0, len(lengths), micro))


parser = argparse.ArgumentParser()
parser.add_argument("--data", default="instrugo:sft")
parser.add_argument("--max-length", type=int, default=320)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--micro-batch-size", type=int, default=8)
args = parser.parse_args()
tokenizer = models.load_tokenizer("default")
examples = [e for e in (tokenize_example(tokenizer, r["messages"], r["response"], args.max_length)
                        for r in load_examples(args.data)) if e]
real = shuffled = sorted_ = 0
for step in range(math.ceil(len(examples) / args.batch_size)):
    lengths = [len(examples[i][0]) for i in step_indices(step, len(examples), args.batch_size, 0)]
    real += sum(lengths)
    shuffled += positions(lengths, args.micro_batch_size)
    sorted_ += positions(sorted(lengths), args.micro_batch_size)
print(f"{args.data}: {len(examples)} examples, max_length {args.max_length}, batch {args.batch_size}, "
      f"micro-batch {args.micro_batch_size}: "
      f"{real:,} tokens; positions in shuffled micro-batches {shuffled:,} ({shuffled / real:.2f}x), "
      f"sorted {sorted_:,} ({sorted_ / real:.2f}x)")
