"""Held-out attention recall of every scorer at several budgets, on the same samples.

Recall@b = share of the true importance mass (the model's own greedy answer's attention to
the prompt, docs/method.md) held by the b entries a method keeps per KV head, averaged
over layers and query heads. Two kinds of held-out samples:

* ``heldout``: the training data's held-out split (same prompt templates as training, unseen prompts);
* ``suite``: the evaluation suite's eval split (tasks, templates, essays and needles never used in
  training), labelled here on the fly.

    python benchmarks/recall.py --data data/smollm2-train --modules src/lookaheadkv/weights/smollm2-135m-instruct \
        --suite-samples 2 --length 1536 --out runs/recall.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from lookaheadkv.engine.generate import eos_ids
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import load_model
from lookaheadkv.policies import H2O, TOVA, LookaheadKV, Oracle, PyramidKV, RandomPolicy, SharedPrefill, SnapKV, StreamingLLM


def scorers(modules) -> dict:
    return {
        "oracle": Oracle(),  # scored from the labels (SharedPrefill's truth): the upper bound
        "random": RandomPolicy(),
        "streamingllm": StreamingLLM(),
        "tova": TOVA(),
        "h2o": H2O(),
        "snapkv": SnapKV(),
        "pyramidkv": PyramidKV(),
        "lookahead": LookaheadKV(modules=modules),
        "lookahead+pool7": LookaheadKV(modules=modules, kernel=7),
        "lookahead+window32": LookaheadKV(modules=modules, window=32),
    }


def recall_of(model, prompt_ids: torch.Tensor, labels: torch.Tensor, policies: dict, budgets: list[int]) -> dict:
    return SharedPrefill(model, prompt_ids[None], policies, truth=labels).recall(budgets)


def suite_items(model, tokenizer, n: int, length: int, max_new_tokens: int):
    from lookaheadkv.tasks import TASKS, make_sample
    from lookaheadkv.training.targets import make_target

    for task in TASKS:
        for i in range(n):
            sample = make_sample(task, tokenizer, length, seed=0, split="eval", index=i)
            target = make_target(model, torch.tensor([sample.prompt_ids]), max_new_tokens, eos_ids(model, tokenizer))
            yield task, target


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a built data folder; its held-out split is scored")
    parser.add_argument("--modules", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--suite-samples", type=int, default=0, help="eval-suite samples per task (0 = skip)")
    parser.add_argument("--length", type=int, default=1536)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ python benchmarks/recall.py " + " ".join(sys.argv[1:] if argv is None else argv))
    model, tokenizer = load_model(args.model)
    modules = LookaheadModules.from_pretrained(args.modules)
    policies = scorers(modules)
    budgets = [int(b) for b in args.budgets.split(",")]
    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    start = time.time()
    if args.data:
        from lookaheadkv.training.data import TargetDataset

        heldout = TargetDataset(args.data, "heldout")
        for i in range(len(heldout)):
            item = heldout[i]
            for k, v in recall_of(model, item["prompt_ids"], item["labels"], policies, budgets).items():
                results["heldout"][k].append(v)
    if args.suite_samples:
        for _task, target in suite_items(model, tokenizer, args.suite_samples, args.length, args.max_new_tokens):
            for k, v in recall_of(model, target["prompt_ids"], target["labels"], policies, budgets).items():
                results["suite"][k].append(v)
    names = list(policies)
    summary = {}
    for kind, table in results.items():
        n = len(next(iter(table.values())))
        print(f"\n{kind}: attention recall (%), mean over {n} samples\n")
        print("| method | " + " | ".join(f"@{b}" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for name in names:
            cells = [100 * sum(table[f"{name}@{b}"]) / n for b in budgets]
            print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        summary[kind] = {k: {"mean": sum(v) / len(v), "values": v} for k, v in table.items()}
    print(f"\n({time.time() - start:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
