"""Benchmark decontaminate's n-gram scan against lm-eval's ``Janitor`` on the same texts and eval items.

Usage (with the project's venv python, e.g. ``.venv/bin/python``)::

    python tools/bench_decontaminate.py --mb 20 --eval-docs 14000 --repeat 3
    python tools/bench_decontaminate.py --index-of-config configs/refinedweb.yaml   # the real tasks' index size

Data (no downloads): web-document-shaped training texts and benchmark-like eval items (15-60 words), both
made by the word Markov chain of ``tools/bench_records.py`` with different seeds, ASCII words only and no
punctuation-only tokens (so that the janitor's per-window normalization and ours see the same words). One
training document in ``--plant-every`` has an eval item copied into it.

Both sides index the same eval items at n = 13 with the janitor's normalization (ASCII lowercase, ASCII
punctuation deleted; ours: ``nfkc: false, punctuation: ascii``). The janitor runs in its Python mode (its C++
``janitor_util`` is not built by the package); it is timed on ``clean_python`` over every document, ours on
``NgramIndex.scan_batch`` (256 documents per vectorised pass, as the stage scans them), one core each. Hits are
the contaminated 13-word windows found; all must find the same number. ``ours-nfkc`` is the stage's default
normalization (NFKC, Unicode punctuation and symbols) on the same texts. Each repeat times all three in an
order rotated per repeat; the best of ``--repeat`` is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_records import make_records

from ipt_hpc.stages.decontam_ngrams import NgramIndex, NgramSettings, Segment

JANITOR_SETTINGS = NgramSettings(n=13, lowercase=True, nfkc=False, punctuation="ascii", min_words=13)


def clean_words(text: str) -> str:
    return " ".join(w for w in text.split() if w.isascii() and any(c.isalnum() for c in w))


def make_data(mb: float, eval_docs: int, plant_every: int, seed: int) -> tuple[list[str], list[str]]:
    records, _ = make_records(int(mb * 1e6), seed)
    texts = [clean_words(r["text"]) for r in records]
    rng = random.Random(seed + 1)
    pool = " ".join(clean_words(r["text"]) for r in make_records(max(200_000, eval_docs * 300), seed + 7)[0]).split()
    items = []
    for _ in range(eval_docs):
        n = rng.randint(15, 60)
        start = rng.randrange(len(pool) - n)
        items.append(" ".join(pool[start : start + n]) + f" item{len(items)}")  # each item unique
    for k in range(0, len(texts), plant_every):
        words = texts[k].split()
        cut = rng.randrange(len(words) + 1)
        texts[k] = " ".join([*words[:cut], items[rng.randrange(len(items))], *words[cut:]])
    return texts, items


def janitor(items: list[str]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor
    j = Janitor(ngram_n=13)
    for item in items:
        j.register_contaminant_python(item)
    return j


def janitor_hits(j, texts: list[str]) -> int:
    from lm_eval.decontamination.janitor import word_ngrams_indices

    return sum(
        1 for t in texts for ngram, _ in word_ngrams_indices(t, 13) if j.normalize_string(ngram) in j.dirt_ngrams
    )


BATCH = 256  # records per vectorised pass, as the stage scans them (decontaminate.SCAN_BATCH)


def ours_scan(index: NgramIndex, texts: list[str]) -> list[list]:
    return [hits for i in range(0, len(texts), BATCH) for hits in index.scan_batch(texts[i : i + BATCH])]


def ours_hits(index: NgramIndex, texts: list[str]) -> int:
    return sum(len({(h.start, h.length) for h in hits}) for hits in ours_scan(index, texts))


def index_of_config(path: str) -> int:
    """Build the index of a config's eval tasks in a temporary run folder and print its size."""
    import tempfile

    from ipt_hpc.config import load_config
    from ipt_hpc.errors import IptError
    from ipt_hpc.stages.decontam_index import build_index

    cfg = load_config(path, None, {})
    with tempfile.TemporaryDirectory() as run:
        try:
            m = build_index(cfg, run)
        except IptError as exc:
            print(f"the index of {path}'s eval tasks cannot be built here:\n{exc}")
            return 1
    print(f"index of {path}: {len(m['tasks'])} tasks, {sum(t['documents'] for t in m['tasks'].values()):,} documents,"
          f" {m['segments']:,} texts, {m['ngrams']:,} distinct n-grams, {m['bytes_in_memory'] / 2**20:,.1f} MiB in"
          f" memory, built in {m['seconds']:.0f} s")  # fmt: skip
    for name, t in sorted(m["tasks"].items()):
        print(f"  {name}: {t['documents']:,} documents")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="training text, MB (10**6 bytes)")
    ap.add_argument("--eval-docs", type=int, default=14000, help="eval items (MMLU has about 14,000 questions)")
    ap.add_argument("--plant-every", type=int, default=50, help="one training document in N holds an eval item")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index-of-config", metavar="FILE", help="only print the index size of a config's eval tasks")
    args = ap.parse_args(argv)
    if args.index_of_config:
        return index_of_config(args.index_of_config)

    texts, items = make_data(args.mb, args.eval_docs, args.plant_every, args.seed)
    size = sum(len(t.encode()) for t in texts)
    print(f"{len(texts):,} training documents, {size / 1e6:.1f} MB; {len(items):,} eval items, 13-grams")
    t0 = time.perf_counter()
    index = NgramIndex.build(JANITOR_SETTINGS, [(Segment("bench", str(i), "question"), t) for i, t in enumerate(items)])
    build_ours = time.perf_counter() - t0
    segments = [(Segment("bench", str(i), "question"), t) for i, t in enumerate(items)]
    default = NgramIndex.build(NgramSettings(), segments)  # the stage's defaults: NFKC, Unicode punctuation
    t0 = time.perf_counter()
    j = janitor(items)
    build_janitor = time.perf_counter() - t0
    print(f"index: ours {index.ngram_count():,} n-grams, {index.nbytes() / 2**20:.1f} MiB, built in {build_ours:.2f} s;"
          f" janitor {len(j.dirt_ngrams):,} n-grams (a set of strings), built in {build_janitor:.2f} s")  # fmt: skip

    runs: dict[str, list[float]] = {"ours": [], "ours-nfkc": [], "janitor": []}
    scanners = {
        "ours": lambda: ours_scan(index, texts),
        "ours-nfkc": lambda: ours_scan(default, texts),
        "janitor": lambda: [j.clean_python(t) for t in texts],
    }
    for r in range(args.repeat):
        order = list(scanners)[r % 3 :] + list(scanners)[: r % 3]
        for name in order:
            t0 = time.perf_counter()
            scanners[name]()
            runs[name].append(time.perf_counter() - t0)
    hits = {"ours": ours_hits(index, texts), "ours-nfkc": ours_hits(default, texts), "janitor": janitor_hits(j, texts)}
    best = {k: min(v) for k, v in runs.items()}
    print(f"\n{'scanner':<10} {'best s':>8} {'MB/s':>8} {'vs janitor':>11} {'hits':>8}   per repeat (s)")
    for name in ("ours", "ours-nfkc", "janitor"):
        ratio = best["janitor"] / best[name]
        per = ", ".join(f"{x:.3f}" for x in runs[name])
        print(f"{name:<10} {best[name]:>8.3f} {size / 1e6 / best[name]:>8.2f} {ratio:>10.2f}x {hits[name]:>8,}   {per}")
    same = hits["ours"] == hits["janitor"] == hits["ours-nfkc"]  # ASCII texts: NFKC and Unicode deletion change none
    fast = size / 1e6 / best["ours"] >= 10 and best["janitor"] / best["ours"] >= 5
    print(f"\nsame hits: {'yes' if same else 'NO'}; target (ours >= 10 MB/s on one core and >= 5x the janitor):"
          f" {'met' if fast else 'not met'}")  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
