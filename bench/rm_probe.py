"""How much of the gold judge's preference a backbone's features hold *linearly*: an L2-regularised logistic
regression on the differences of two responses' features, fitted on a labeled comparison file's pairs
(ordered by its labels, or by the gold judge), scored against the gold judge on a test file (e.g. the one
`bench/rm_accuracy.py` describes). Features: the final hidden state at the response's EOS, which a reward
model's score head reads ("eos"), and that joined with the mean over all tokens ("eos+mean"). A reward model
fine-tuned on the same pairs that scores no better than this probe has learned no feature the backbone lacked.
Usage: .venv/bin/python bench/rm_probe.py BACKBONE TRAIN_LABELED.jsonl TEST_LABELED.jsonl [--max-length 320]"""
import argparse
import json

import torch

from instrugo import models, reward
from instrugo.comparisons import read_tasks
from instrugo.generation import pad_batch
from instrugo.judge import gold_judge

L2_STRENGTHS = (1e-1, 1e-2, 1e-3, 1e-4)


@torch.no_grad()
def response_features(backbone, tokenizer, tasks, max_length: int, precision: str) -> dict[str, list[torch.Tensor]]:
    """Per task, a [K, d] tensor of EOS features and a [K, 2d] tensor of EOS and mean features."""
    eos_features, both = [], []
    for task in tasks:
        ids, mask = pad_batch([reward.reward_inputs(tokenizer, task.prompt, r, max_length) for r in task.responses],
                              tokenizer.pad_token_id, "right")
        with models.autocast(precision):
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        eos = hidden[torch.arange(len(ids)), mask.sum(1) - 1]
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        eos_features.append(eos)
        both.append(torch.cat([eos, mean], 1))
    return {"eos": eos_features, "eos+mean": both}


def ordered_pairs(task, by_gold: bool) -> list[tuple[int, int]]:
    """(better, worse) index pairs of a task, by its labels or by the gold judge (ties dropped)."""
    if not by_gold:
        return task.pairs()
    gold = [gold_judge(task.example, r).score for r in task.responses]
    return [(i, j) for i in range(len(gold)) for j in range(len(gold)) if gold[i] > gold[j]]


def pair_differences(tasks, features, by_gold: bool) -> torch.Tensor:
    return torch.stack([f[i] - f[j] for task, f in zip(tasks, features) for i, j in ordered_pairs(task, by_gold)])


def fit_logistic(differences: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights w minimising mean softplus(−x·w) + l2·|w|² over the better-minus-worse differences x (no
    intercept: a pair read the other way round is the negated difference)."""
    weights = torch.zeros(differences.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-differences @ weights).mean() + l2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone")
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--max-length", type=int, default=320)
    args = parser.parse_args()
    precision = models.setup_compute("auto")
    tokenizer = models.load_tokenizer(args.backbone)
    backbone = models.load_scalar_model(args.backbone, tokenizer, args.max_length).model.eval()
    train = [t for t in read_tasks(args.train, require_ranking=True) if t.pairs()]
    test = [t for t in read_tasks(args.test, require_ranking=True) if t.pairs()]
    train_features = response_features(backbone, tokenizer, train, args.max_length, precision)
    test_features = response_features(backbone, tokenizer, test, args.max_length, precision)
    for pooling in train_features:
        test_x = pair_differences(test, test_features[pooling], by_gold=True)
        for by_gold in (False, True):
            train_x = pair_differences(train, train_features[pooling], by_gold)
            scale = train_x.std(0) + 1e-6  # differences are symmetric about 0: scale, do not centre
            for l2 in L2_STRENGTHS:
                weights = fit_logistic(train_x / scale, l2)
                print(json.dumps({
                    "features": pooling, "fitted_on": "gold" if by_gold else "labels", "l2": l2,
                    "train_accuracy": round(((train_x / scale) @ weights > 0).float().mean().item(), 3),
                    "test_accuracy_vs_gold": round(((test_x / scale) @ weights > 0).float().mean().item(), 3),
                    "train_pairs": len(train_x), "test_pairs": len(test_x)}), flush=True)


if __name__ == "__main__":
    main()
