"""One owner of a run folder's paths: ``ipt_hpc.layout``; no other module spells them."""

from __future__ import annotations

import re
from pathlib import Path

from ipt_hpc.layout import RunLayout, state_dir

PACKAGE = Path(__file__).resolve().parent.parent / "ipt_hpc"
# a run path spelt out: joining a literal run sub-folder, or the bookkeeping folder's name
SPELT = re.compile(
    r'/ "(?:_state|tokens|train|hf|eval|report|raw|synth|augmented|checkpoints)"|"_state"|"mixture\.json"'
)


def test_checkpoints_lead_back_to_their_run(tmp_path: Path) -> None:
    run = RunLayout.of(tmp_path / "run")
    iteration = run.checkpoints / "iter_0000010"
    assert RunLayout.of_checkpoint(iteration) == run
    assert RunLayout.of_checkpoint(tmp_path / "elsewhere" / "iter_0000010") is None
    assert run.token_group("augmented").parent == run.tokens and state_dir(run.raw) == run.raw / "_state"


def test_no_module_but_the_layout_spells_a_run_path() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SPELT.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, "ask ipt_hpc.layout instead:\n" + "\n".join(offenders)
