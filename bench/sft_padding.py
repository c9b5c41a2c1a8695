"""How much padding SFT's micro-batches carry on a dataset: token positions against real tokens, for steps
of the epoch's shuffle in order, the same steps sorted by length within each step, and length-grouped steps
(`training.length_grouped_steps`, what `instrugo sft` and `instrugo rm` do).
Usage: .venv/bin/python bench/sft_padding.py [--data D] [--max-length N] [--batch-size N] [--micro-batch-size N]
(defaults: the demo's SFT settings)."""
import argparse

from instrugo import models
from instrugo.data import load_examples
from instrugo.sft import tokenize_example
from instrugo.training import epoch_order, length_grouped_steps


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
lengths = [len(ids) for ids, _ in filter(None, (tokenize_example(tokenizer, r["messages"], r["response"], args.max_length)
                                                for r in load_examples(args.data)))]
order = epoch_order(len(lengths), 0, 0)
shuffled_steps = [[lengths[i] for i in order[s:s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
grouped_steps = [[lengths[i] for i in step] for step in length_grouped_steps(lengths, args.batch_size, 0, 0)]
real = sum(lengths)
counts = {"shuffled steps": sum(positions(step, args.micro_batch_size) for step in shuffled_steps),
          "sorted within each step": sum(positions(sorted(step), args.micro_batch_size) for step in shuffled_steps),
          "length-grouped steps": sum(positions(step, args.micro_batch_size) for step in grouped_steps)}
print(f"{args.data}: {len(lengths)} examples, max_length {args.max_length}, batch {args.batch_size}, "
      f"micro-batch {args.micro_batch_size}: {real:,} tokens; token positions: "
      + "; ".join(f"{name} {n:,} ({n / real:.2f}x)" for name, n in counts.items()))
