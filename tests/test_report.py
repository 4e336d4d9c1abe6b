"""report: a run's page in markdown and HTML, checked in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from test_fanout import make_raw
from test_templify import cfg, make_synth

from ipt_hpc import report
from ipt_hpc.execution import run_stage, shard_name
from ipt_hpc.records import read_records
from ipt_hpc.stages import templify


def browser() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("IPT_REQUIRE_CHROMIUM") == "1":
        pytest.fail("IPT_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
    return found


def test_report_lists_the_stages_and_renders_its_charts_in_a_browser(tmp_path: Path) -> None:
    run = make_synth(make_raw(tmp_path / "run", 2, docs=60), 2, share=0.7)
    run_stage(templify.STAGE, cfg(), run)
    proc = run_cli("report", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    md = (run / "report" / "report.md").read_text()
    assert "## Stages" in md and "## Instruction-augmented texts" in md
    row = re.search(r"\| templify \| augmented \| 2/2 \| (\d+) \|", md)
    texts = sum(1 for k in range(2) for _ in read_records(run / "augmented" / shard_name(k, 2)))
    assert row and int(row.group(1)) == texts
    assert "## Training" not in md  # no training in this run: no empty section
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images and all((run / "report" / name).read_bytes()[:4] == b"\x89PNG" for name in images)
    exe = browser()
    if exe is None:
        pytest.skip("no chromium on PATH: the HTML was not checked in a browser")
    html = run / "report" / "report.html"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([*cmd, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    tags = re.findall(r"<img [^>]*>", dom)
    assert len(tags) == len(images), dom[:2000]
    assert all('data-loaded="yes"' in t for t in tags), tags  # every chart decoded by the browser
    shot = tmp_path / "shot.png"
    subprocess.run([*cmd, f"--screenshot={shot}", "--window-size=1000,1400", html.as_uri()], timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_broken_image_is_flagged_by_the_page(tmp_path: Path) -> None:
    run = make_synth(make_raw(tmp_path / "run", 1, docs=20), 1)
    run_stage(templify.STAGE, cfg(), run)
    out = report.build(run)
    (run / "report" / "templify_layouts.png").write_bytes(b"not a png")
    exe = browser()
    if exe is None:
        pytest.skip("no chromium on PATH")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", Path(out["html"]).as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    broken = [t for t in re.findall(r"<img [^>]*>", dom) if "templify_layouts.png" in t]
    assert broken and 'data-loaded="no"' in broken[0]
