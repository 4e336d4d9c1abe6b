"""Check a finished demo run (CI runs it after `make demo`): the whole chain produced real results.

    python tools/check_demo.py runs/demo

Checks: parsable pairs on most synthesized documents, every augmented pair rendered, both token groups
written, the training loss went down, the exported model and lm-eval's JSON exist, the report page
exists with its charts. Prints one line per check; exits 1 if any fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path) -> int:
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append((name, ok, detail))

    synth = json.loads((run / "synth" / "manifest.json").read_text())["totals"]
    with_pairs = synth["docs"] - synth["docs_without_pairs"]
    check("pairs parsed on most documents", with_pairs > 0.5 * synth["docs"], f"{with_pairs}/{synth['docs']}")
    aug = json.loads((run / "augmented" / "manifest.json").read_text())["totals"]
    rendered = aug["pairs"] + aug["pairs_dropped"] == aug["pairs_in"] and aug["pairs"] > 0
    check(
        "every pair rendered once or dropped as malformed",
        rendered,
        f"{aug['pairs']} + {aug['pairs_dropped']} dropped of {aug['pairs_in']}",
    )
    check(
        "layout mix in the manifest", bool(aug["layouts"]), ", ".join(f"{k} {v:.1%}" for k, v in aug["layouts"].items())
    )
    for group in ("augmented", "raw"):
        m = json.loads((run / "tokens" / group / "manifest.json").read_text())
        size = (run / "tokens" / f"{group}.bin").stat().st_size
        check(f"tokens written ({group})", m["tokens"] > 0 and size > 0, f"{m['tokens']:,} tokens")
    steps = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s.get("kind") == "step"]
    check("loss decreased", len(losses) > 1 and losses[-1] < losses[0] - 0.5, f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    check("exported model", (run / "hf" / "config.json").exists(), str(run / "hf"))
    evals = [p for p in (run / "eval").glob("*.json") if p.name != "manifest.json"]
    results = {k: v for p in evals for k, v in json.loads(p.read_text()).get("results", {}).items()}
    check("eval JSON present", bool(results), ", ".join(results) or "none")
    html = run / "report" / "report.html"
    images = list((run / "report").glob("*.png"))
    check("report with charts", html.exists() and len(images) >= 4, f"{len(images)} PNG files")
    check("report shows the layout mix", "layout mix" in html.read_text(encoding="utf-8"), str(html))
    for name, ok, detail in checks:
        print(f"{'ok ' if ok else 'FAIL'} {name}: {detail}")
    failed = sum(not ok for _, ok, _ in checks)
    print(f"demo checks: {len(checks) - failed} of {len(checks)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
