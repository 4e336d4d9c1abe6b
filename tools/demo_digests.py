"""Digests of a run's data files, to show that a change of code did not change the data it makes.

    python tools/demo_digests.py runs/demo --write tools/demo_digests.json    # before the change
    python tools/demo_digests.py runs/demo --compare tools/demo_digests.json  # after: exit 1 on a difference

Covers the bytes of every data stage: the shards of ``raw``, ``synth`` and ``augmented`` and the token
groups' ``.bin``/``.idx`` (merged and per shard). Manifests and markers are left out: they hold times,
hosts and absolute paths. Generation is deterministic on one machine (greedy, CPU), so compare runs made
on the same machine. ``tools/demo_digests.json`` holds the demo's digests made by the code before the
issue-18 refactor (main at 3572d2f, `make demo` in a CI run on this workplace's 2-core machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipt_hpc.layout import RunLayout


def data_files(run: Path) -> list[Path]:
    layout = RunLayout.of(run)
    files = [
        p for stage in (layout.raw, layout.synth, layout.augmented) for p in sorted(stage.glob("shard-*.jsonl.zst"))
    ]
    files += sorted(p for p in layout.tokens.rglob("*") if p.suffix in (".bin", ".idx"))
    return files


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in data_files(run)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FILE")
    group.add_argument("--compare", metavar="FILE")
    args = ap.parse_args()
    got = digests(Path(args.run))
    if not got:
        print(f"{args.run}: no data files (is it a run folder?)", file=sys.stderr)
        return 2
    if args.write:
        Path(args.write).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"{len(got)} data files -> {args.write}")
        return 0
    want = json.loads(Path(args.compare).read_text(encoding="utf-8"))
    differ = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    for label, names in (("differs", differ), ("missing", missing), ("new", extra)):
        for name in names:
            print(f"{label}: {name}")
    same = not (differ or missing or extra)
    print(
        f"{len(want.keys() & got.keys()) - len(differ)} of {len(want)} data files identical" + ("" if same else "; NOT")
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
