"""Across nodes on the multi-node local Slurm (``tools/local-slurm up --nodes 3``): node1..node3 are slurmd's in
their own network and hostname namespaces, in partition ``nodes``, over this machine's one filesystem.

Training jobs of 2 nodes x 2 ranks (gloo), started as a user starts them (``launch train --executor slurm`` and
the hand-written ``sbatch slurm/train.sbatch``), give the same losses as the same layout on one node; their
tensor, pipeline and data-parallel groups span the hosts the layout says; a node lost mid-run is survived."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_failures import demo_sets
from test_train import REPO, SMALL, TINY, _env, events, finish, losses, new_run, start, tail

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]

PARTITION = "nodes"
LOCAL_SLURM = REPO / "tools" / "local-slurm"


def _nodes() -> dict[str, str]:
    """State of each node of the multi-node partition (empty without one)."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], capture_output=True, text=True, timeout=20
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split() for line in out.stdout.splitlines() if line.strip()) if out.returncode == 0 else {}


@pytest.fixture(scope="module", autouse=True)
def multinode_cluster() -> dict[str, str]:
    """The 3-node partition, idle; skips without it (fails under IPT_REQUIRE_SLURM=1, as in CI)."""
    nodes = _nodes()
    if len(nodes) < 3:
        msg = f"no multi-node local Slurm (partition {PARTITION!r}: {nodes}); run: tools/local-slurm up --nodes 3"
        if os.environ.get("IPT_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return nodes


def _queued(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=60).stdout
    return [line for line in out.splitlines() if line.split()[1:] == [name]]


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def wait_for(what: str, check, timeout: float, job: str | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            state = job_state(job) if job else {}
            text = "".join(p.read_text()[-3000:] for p in sorted(log.glob("slurm-*.out"))) if log else ""
            raise AssertionError(f"timed out waiting for {what} (job {job}: {state.get('JobState')}):\n{text}")
        time.sleep(0.5)


def test_each_node_is_a_host_of_its_own() -> None:
    """One task on each of the 3 nodes: its own hostname and address, the others' names resolve (the
    rendezvous needs MASTER_ADDR=node1), the shared filesystem; ``status`` lists each node's slurmd."""
    script = 'echo "$(hostname) $(ip -4 -o addr show eth0 | awk \'{print $4}\') $(getent hosts node1 | cut -d" " -f1)"'
    out = subprocess.run(
        ["srun", f"--partition={PARTITION}", "--nodes=3", "--ntasks-per-node=1", "--time=2", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n")[:-1])
    assert [line.split()[0] for line in lines] == ["node1", "node2", "node3"], lines
    assert len({line.split()[1] for line in lines}) == 3 and len({line.split()[2] for line in lines}) == 1, lines
    status = subprocess.run([str(LOCAL_SLURM), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "local slurm cluster is UP" in status.stdout, status.stdout
    for node in ("node1", "node2", "node3"):
        assert re.search(
            rf"slurmd +running \(pid \d+\) for node {node} in namespace lslurm-{node} at 10\.", status.stdout
        )
    # up again from the tests' environment (OMP_NUM_THREADS=1, which GNU nproc answers): nothing changes
    again = subprocess.run([str(LOCAL_SLURM), "up", "--nodes", "3"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert again.returncode == 0 and "slurm.conf unchanged" in again.stdout, again.stdout + again.stderr
    cpus = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True, timeout=30).stdout
    assert {line.split()[1] for line in cpus.splitlines()} == {str(len(os.sched_getaffinity(0)))}, cpus
    bad = subprocess.run([str(LOCAL_SLURM), "up", "--nodes", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--nodes must be 1..99, got '0'" in bad.stderr, bad.stderr
    bad = subprocess.run([str(LOCAL_SLURM), "crash", "node9"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no namespaced node 'node9' (have: node1 node2 node3" in bad.stderr, bad.stderr


def launch_train(run: Path, *sets: str, env: dict[str, str] | None = None) -> str:
    """``launch train --executor slurm`` on 2 nodes x 2 ranks of the multi-node partition; returns the job id."""
    cmd = [sys.executable, "-m", "ipt_hpc.launch", "train", "--config", str(TINY), "--run", str(run)]
    cmd += ["--executor", "slurm", "--nodes", "2", "--ranks-per-node", "2"]
    for s in (*SMALL, f"execution.slurm.partition={PARTITION}", "execution.slurm.cpus_per_task=1", *sets):
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("submitted training job ")[1].split(";")[0]


def wait_done(run: Path, job: str, timeout: float = 400) -> None:
    logs = run / "train" / "logs"

    def done() -> bool:
        state = job_state(job).get("JobState", "GONE")
        assert (
            state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
            or (run / "train" / "done.json").exists()
        ), f"job {job} {state}:\n" + "".join(p.read_text()[-4000:] for p in logs.glob("slurm-*.out"))
        return (run / "train" / "done.json").exists() and state in ("COMPLETED", "GONE")

    wait_for(f"job {job} to finish", done, timeout, job, logs)


def rank_table(run: Path) -> list[dict]:
    return json.loads((run / "train" / "ranks.json").read_text())["ranks"]


def hosts_of(table: list[dict], group: list[int]) -> set[str]:
    return {table[r]["host"] for r in group}


def check_placement(table: list[dict]) -> None:
    """4 ranks, 2 per host, global rank = 2 * node + local rank; the GPU path's device is the local rank."""
    assert [r["rank"] for r in table] == [0, 1, 2, 3]
    assert [r["host"] for r in table] == ["node1", "node1", "node2", "node2"] or len({r["host"] for r in table}) == 2
    by_host: dict[str, list[int]] = {}
    for r in table:
        by_host.setdefault(r["host"], []).append(r["rank"])
        assert r["world_size"] == 4 and r["device"] == "cpu"
        assert r["cuda_device"] == f"cuda:{r['local_rank']}", r  # never cuda:{global rank}
    assert sorted(len(v) for v in by_host.values()) == [2, 2], by_host
    second = [r for r in table if r["rank"] >= 2]
    assert {r["local_rank"] for r in second} == {0, 1} and {r["cuda_device"] for r in second} == {"cuda:0", "cuda:1"}


def test_tp2_pp2_across_two_nodes_matches_one_node(tmp_path: Path) -> None:
    """TP=2 x PP=2 on 2 nodes x 2 ranks through ``launch train --executor slurm``: the pipeline groups span
    both hosts (each TP pair stays on one), and the losses equal the same layout's on one node."""
    layout = ("train.tensor_parallel=2", "train.pipeline_parallel=2")
    reference = new_run(tmp_path, "one-node")
    proc = start(reference, 4, *layout)
    run = new_run(tmp_path, "two-nodes")
    job = launch_train(run, *layout)
    assert finish(proc, timeout=400) == 0, tail(reference)
    wait_done(run, job)
    table = rank_table(run)
    check_placement(table)
    for r in table:
        assert len(hosts_of(table, r["tp_group"])) == 1, r  # tensor parallel inside a node (Megatron's order)
        assert len(hosts_of(table, r["pp_group"])) == 2, r  # the pipeline crosses the network
        assert r["dp_group"] == [r["rank"]]
    ranks_event = next(e for e in events(run) if e["event"] == "ranks")
    assert ranks_event["hosts"] == sorted({r["host"] for r in table})
    assert events(run)[0]["world_size"] == 4 and events(run)[0]["dp"] == 1
    np.testing.assert_array_equal(losses(run), losses(reference))  # step for step, bit for bit


@pytest.fixture(scope="module")
def tp2_dp2_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TP=2 x DP=2 on one node: 4 ranks under torchrun (the periodic saves the tests add change no loss)."""
    run = new_run(tmp_path_factory.mktemp("multinode"), "one-node")
    assert finish(start(run, 4, "train.tensor_parallel=2"), timeout=400) == 0, tail(run)
    return run


def test_dp2_across_two_nodes_from_the_hand_written_sbatch(tmp_path: Path, tp2_dp2_reference: Path) -> None:
    """TP=2 x DP=2 on 2 nodes x 2 ranks, submitted with ``sbatch slurm/train.sbatch RUN --config ...`` as the
    script's header shows: the data-parallel groups span both hosts; the losses equal one node's."""
    layout = ("train.tensor_parallel=2",)
    run = new_run(tmp_path, "two-nodes")
    (run / "train").mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--partition={PARTITION}", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1"]
    cmd += [f"--output={run / 'train' / 'slurm-%j.out'}", str(REPO / "slurm" / "train.sbatch"), str(run)]
    cmd += ["--config", str(TINY)]
    for s in (*SMALL, *layout):
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=_env(IPT_PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    wait_for(f"job {job}", lambda: job_state(job).get("JobState") in ("COMPLETED", "FAILED", None), 400, job)
    log = "".join(p.read_text() for p in (run / "train").glob("slurm-*.out"))
    assert job_state(job).get("JobState") in ("COMPLETED", None), log[-4000:]
    assert (run / "train" / "done.json").exists(), log[-4000:]
    table = rank_table(run)
    check_placement(table)
    for r in table:
        assert len(hosts_of(table, r["tp_group"])) == 1, r
        assert len(hosts_of(table, r["dp_group"])) == 2, r  # gradients all-reduced across the network
        assert r["pp_group"] == [r["rank"]]
    # each rank's line in the job's log: host, global and local rank, groups
    for r in table:
        assert f"rank {r['rank']}/4 on {r['host']} (local rank {r['local_rank']}" in log, log[-4000:]
    assert f"on node[1-2], master {table[0]['host']}:" in log or "master node" in log, log[-4000:]
    np.testing.assert_array_equal(losses(run), losses(tp2_dp2_reference))


def test_warning_signal_then_a_lost_node_resume_to_the_same_losses(tmp_path: Path, tp2_dp2_reference: Path) -> None:
    """A 2-node job on the 3-node partition: USR1 to the batch shell (what ``--signal=B:USR1@T`` sends) reaches
    the ranks on both nodes through srun: one checkpoint, a requeue, a resume. Then its second node crashes
    (``tools/local-slurm crash``: slurmd, steps and ranks killed, the node set DOWN): Slurm requeues the job,
    it resumes from its last complete checkpoint on the two nodes left and ends with the undisturbed losses."""
    layout = ("train.tensor_parallel=2", "train.save_interval=4")
    run = new_run(tmp_path, "disturbed")
    job = launch_train(run, *layout, env=_env(IPT_TRAIN_TEST_STEP_SLEEP="0.6"))
    logs = run / "train" / "logs"
    log = run / "train" / "log.jsonl"
    crashed = None
    timeline: list[tuple[float, str]] = []

    def step() -> int:
        from ipt_hpc.model.train.metrics import read_steps

        return max(read_steps(log), default=0) if log.exists() else 0

    try:
        wait_for("step 3", lambda: step() >= 3, 300, job, logs)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
        timeline.append((time.time(), f"USR1 at step {step()}"))
        resumed = lambda n: sum(e["event"] == "resume" for e in events(run)) >= n  # noqa: E731
        wait_for("the resume after USR1", lambda: resumed(1), 300, job, logs)
        first_resume = next(e for e in events(run) if e["event"] == "resume")["iteration"]
        timeline.append((time.time(), f"resumed at iteration {first_resume}"))
        saved_after = lambda: any(  # noqa: E731
            e["event"] == "save" and e["iteration"] > first_resume for e in events(run)
        )
        wait_for("a periodic checkpoint after the resume", saved_after, 300, job, logs)
        wait_for("one more step", lambda: step() > max(e["iteration"] for e in events(run) if e["event"] == "save"), 60)
        info = job_state(job)
        nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True)
        hosts = nodes.stdout.split()
        assert len(hosts) == 2 and info["JobState"] == "RUNNING", info
        crashed = next(h for h in hosts if h != info["BatchHost"])
        before = step()
        out = subprocess.run([str(LOCAL_SLURM), "crash", crashed], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        timeline.append((time.time(), f"{crashed} crashed at step {before} (job on {hosts})"))
        wait_for("the resume after the crash", lambda: resumed(2), 400, job, logs)
        timeline.append(
            (time.time(), f"resumed at iteration {[e for e in events(run) if e['event'] == 'resume'][1]['iteration']}")
        )
        wait_done(run, job, timeout=400)
        timeline.append((time.time(), "done"))
    finally:
        subprocess.run(["scancel", job], check=False, timeout=30)
        if crashed:  # the node comes back for the tests after this one
            subprocess.run([str(LOCAL_SLURM), "revive", crashed], check=False, timeout=120, capture_output=True)
        t0 = timeline[0][0] if timeline else 0
        print("\n".join(f"{t - t0:7.1f} s  {what}" for t, what in timeline))
    table = json.loads((run / "train" / "ranks.json").read_text())
    assert table["restart"] == 2 and crashed not in {r["host"] for r in table["ranks"]}, table
    check_placement(table["ranks"])
    names = [e["event"] for e in events(run)]
    assert names.count("resume") == 2 and names.count("exit") == 1 and names[-1] == "done", names
    assert next(e for e in events(run) if e["event"] == "exit")["reason"] == "SIGUSR1"
    slurm_log = "".join(p.read_text() for p in logs.glob("slurm-*.out"))
    assert "requeueing job" in slurm_log and "restart 2" in slurm_log, slurm_log[-3000:]
    np.testing.assert_array_equal(losses(run), losses(tp2_dp2_reference))


def stage(run: Path, model: Path, name: str, *extra: str, slurm: bool = False, wait: bool = True) -> str:
    """One stage through the CLI as a user runs it; on Slurm, arrays on the multi-node partition, one task
    per node at a time (2 CPUs each) so that they spread. 96 new tokens: a synthesis shard takes ~20 s here,
    long enough to lose its node mid-shard. Returns stdout."""
    args = [name, "--run", str(run), *demo_sets(model), "--set", "synth.max_new_tokens=96", *extra]
    if slurm:
        args += ["--executor", "slurm", "--partition", PARTITION, "--set", "execution.slurm.cpus_per_task=2"]
        args += ["--set", "execution.slurm.time_min=20", *(["--wait"] if wait else [])]
    proc = run_cli(*args)
    assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


TOKENIZE = ("--input-stage", "augmented", "--record-group", "augmented", "--group", "augmented")


def outputs(run: Path) -> dict[str, str]:
    files = [*run.glob("synth/shard-*"), *run.glob("augmented/shard-*"), *run.glob("tokens/augmented*")]
    files += run.glob("tokens/augmented/shard-*")
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files) if p.is_file()}


def task_hosts(stage_dir: Path) -> dict[str, tuple[str, str]]:
    """Per shard, the (job, host) of its attempts' last start, as the task logged it."""
    out = {}
    for path in sorted((stage_dir / "_state" / "attempts").glob("*.jsonl")):
        starts = [json.loads(line) for line in path.read_text().splitlines() if '"start"' in line]
        out[path.name] = (starts[-1]["job"], starts[-1]["host"])
    return out


def slurm_nodes(job: str) -> str:
    """The node list Slurm reports for one array task (``ARRAY_TASK`` job id)."""
    return job_state(job).get("NodeList", "?")


def test_arrays_across_nodes_give_the_local_bytes_and_survive_a_lost_node(tmp_path: Path, tiny_synth: Path) -> None:
    """synthesize, templify and tokenize as job arrays on 3 nodes: tasks land on several hosts (each task's
    host, as it logged it, is the node Slurm reports for it), the outputs equal the local executor's byte for
    byte, and a node crashed while it runs synthesis tasks leaves those shards to be redone elsewhere (Slurm
    requeues the task; what it does not is ``--shards failed``) to the same bytes."""
    local = tmp_path / "local"
    for name, extra in (("shard", ()), ("synthesize", ()), ("templify", ()), ("tokenize", TOKENIZE)):
        stage(local, tiny_synth, name, *extra)
    run = tmp_path / "slurm"
    stage(run, tiny_synth, "shard")
    stage(run, tiny_synth, "synthesize", slurm=True, wait=False)
    synth = run / "synth"
    crashed = None
    try:

        def busy_node() -> str | None:  # a node running a synthesis task for 2 s, its shard far from done
            for marker in (synth / "_state" / "running").glob("*.json"):
                info = json.loads(marker.read_text())
                if str(info.get("host", "")).startswith("node") and time.time() - info["started"] > 2:
                    return info["host"]
            return None

        crashed = wait_for("a synthesis task running for 2 s", busy_node, 300)
        out = subprocess.run([str(LOCAL_SLURM), "crash", crashed], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        wait_for("the synthesis arrays to leave the queue", lambda: not _queued("ipt-synthesize"), 600)
        if len(list(synth.glob("shard-*.jsonl.zst"))) < 4:  # not requeued by Slurm: the operator's resume
            stage(run, tiny_synth, "synthesize", "--shards", "failed", slurm=True)
    finally:
        if crashed:
            subprocess.run([str(LOCAL_SLURM), "revive", crashed], check=False, timeout=120, capture_output=True)
    stage(run, tiny_synth, "templify", slurm=True)
    stage(run, tiny_synth, "tokenize", *TOKENIZE, slurm=True)

    attempts = {}
    for folder in ("synth", "augmented", "tokens/augmented"):
        hosts = task_hosts(run / folder)
        assert len(hosts) == 4, (folder, hosts)
        for shard_file, (job, host) in hosts.items():
            assert slurm_nodes(job) == host, (folder, shard_file, job, host)  # what the task says = what Slurm says
        attempts[folder] = hosts
        assert len({h for _, h in hosts.values()}) >= 2, (folder, hosts)  # spread over hosts
    redone = [s for s, (_, h) in attempts["synth"].items() if h != crashed]
    assert crashed not in {h for _, h in attempts["synth"].values()} or redone, attempts["synth"]
    restarts = [
        json.loads(line)
        for path in (synth / "_state" / "attempts").glob("*.jsonl")
        for line in path.read_text().splitlines()
        if '"start"' in line and json.loads(line)["attempt"] > 1
    ]
    assert restarts and all(r["host"] != crashed for r in restarts), restarts  # redone on the other nodes
    assert outputs(run) == outputs(local) and len(outputs(local)) == 4 + 4 + 2 + 8
