"""Build the demo's local lm-eval task (data/eval/demo_mc.jsonl): which standard-library module a
docstring comes from, four choices.

The demo cannot download lm-eval's benchmark datasets (no network), so it evaluates on a small
multiple-choice task made from its own bundled corpus, as an air-gapped cluster would with a custom
task. Each item: the docstring's first sentence, the right module (from the record's url) and three
other modules, in a seeded order. The task's YAML is configs/eval/demo_mc.yaml.

    python tools/make_demo_eval_task.py data/demo data/eval/demo_mc.jsonl
"""

from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path


def records(folder: Path):
    for path in sorted(folder.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)


def first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    m = re.match(r"(.{20,240}?[.!?])(\s|$)", flat)
    return (m.group(1) if m else flat[:200]).strip()


def main(src: str, out: str, items: int = 120, seed: int = 0) -> None:
    rng = random.Random(seed)
    docs = []
    for rec in records(Path(src)):
        module = rec["url"].split("/library/")[1].split(".html")[0]
        docs.append((module, first_sentence(rec["content"])))
    modules = sorted({m for m, _ in docs})
    rng.shuffle(docs)
    with open(out, "w", encoding="utf-8") as fh:
        for module, sentence in docs[:items]:
            choices = [module, *rng.sample([m for m in modules if m != module], 3)]
            rng.shuffle(choices)
            item = {"text": sentence, "choices": choices, "label": choices.index(module)}
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{min(items, len(docs))} items, {len(modules)} modules -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
