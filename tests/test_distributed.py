"""Two CPU processes on gloo, spawned by the test: DDP and FSDP2 give the single-process numbers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import HANG_S
from gradscope.report import Report

HERE = Path(__file__).resolve().parent
TARGET = HERE / "dist_target.py"
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(callable_name: str, tmp_path: Path, *extra: str, world: int = 2, timeout_s: int = 20):
    """Start ``world`` processes of ``python -m gradscope diagnose`` as torchrun would; wait for all."""
    port = free_port()
    output = tmp_path / f"{callable_name}.json"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GRADSCOPE_DIST_TIMEOUT": str(timeout_s), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "gradscope", "diagnose", f"{TARGET}:{callable_name}", "--steps", "6",
               "--device", "cpu", "--format", "json", "--output", str(output), *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=HANG_S) for p in procs]
    return [p.returncode for p in procs], results, output


def single_process(tmp_path: Path) -> dict:
    out = tmp_path / "single.json"
    subprocess.run([sys.executable, "-m", "gradscope", "diagnose", f"{TARGET}:single", "--steps", "6", "--device",
                    "cpu", "--format", "json", "--output", str(out)], cwd=tmp_path, check=False, timeout=HANG_S)
    return Report.from_json(out)


def assert_same_numbers(doc: dict, reference: dict) -> None:
    assert doc["global"]["norm"] == pytest.approx(reference["global"]["norm"], rel=1e-5)
    assert doc["global"]["loss"] == pytest.approx(reference["global"]["loss"], rel=1e-5)
    for layer, ref in zip(doc["layers"], reference["layers"]):
        assert layer["name"] == ref["name"]
        assert layer["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        for key in ("grad_abs_max", "weight_norm", "update_ratio_median", "grad_mean", "grad_abs_p99"):
            assert layer["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-4, abs=1e-9), key
    assert [(f["rule_id"], f["layer"]) for f in doc["findings"]] == \
        [(f["rule_id"], f["layer"]) for f in reference["findings"]]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_run_equals_single_process(tmp_path, strategy):
    codes, results, output = run_ranks(strategy, tmp_path)
    assert codes == [0, 0], results
    assert results[1][0] == "", "only rank 0 writes"
    doc = Report.from_json(output)
    assert "2 ranks" in doc["measurement"] and "global" in doc["measurement"]
    assert_same_numbers(doc, single_process(tmp_path))


def run_api_ranks(callable_name: str, tmp_path: Path, world: int = 2):
    """``world`` processes of tests/dist_trials.py: diagnose() on every rank, each writing its trial table."""
    port, prefix = free_port(), tmp_path / callable_name
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GRADSCOPE_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(HERE / "dist_trials.py"), callable_name, str(prefix)],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=HANG_S) for p in procs]
    assert [p.returncode for p in procs] == [0] * world, results
    return [json.loads(Path(f"{prefix}.{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_trials_that_every_rank_agrees_on_and_a_single_process_repeats(tmp_path, strategy):
    """Every rank restarts each trial from its own copy of the same state (its shards under FSDP2), trains its
    slice of the global batch and judges on its slice of the held-out batches, the figures averaged over the
    ranks: the trial table is identical on every rank, and it is the single process's on the same global
    batch up to the last bits (the mean of two half-batch means is the whole batch's mean in exact
    arithmetic). This run is not chaotic, so the threshold is the single process's exactly."""
    import dist_target
    import gradscope
    ranks = run_api_ranks(f"{strategy}_hot", tmp_path)
    assert ranks[0]["trials"] is not None and ranks[0]["method"] == "norm"
    same = [{k: v for k, v in r.items() if k != "state_bytes"} for r in ranks]  # shards may split unevenly
    assert same[0] == same[1]  # every float of every trial, the winner and the steps spent
    assert "unclipped-unstable-in-trials" in ranks[0]["findings"]
    single = gradscope.diagnose(dist_target.single_hot(), steps=30, seed=0)
    trials = single.recommendation.evidence.trials
    assert ranks[0]["winner"] == trials.winner and ranks[0]["spent"] == trials.spent
    # memory per rank: a whole replica's state under DDP, this rank's shards (about half of it) under FSDP2
    for rank in ranks:
        if strategy == "ddp":
            assert rank["state_bytes"] == trials.state_bytes
        else:
            assert 0.4 * trials.state_bytes < rank["state_bytes"] < 0.6 * trials.state_bytes
    alone = {t.threshold: t for t in trials.trials}
    assert [r["threshold"] for r in ranks[0]["trials"][1:]] == sorted(alone, reverse=True)
    for run in ranks[0]["trials"][1:]:
        mine = alone[run["threshold"]]
        assert bool(run["unstable"]) == (not mine.stable)
        if mine.stable:
            assert run["held_out"] == pytest.approx(mine.held_out, rel=1e-4)
            assert run["losses"] == pytest.approx(list(mine.losses), rel=1e-4)


def test_a_rank_killed_in_a_trial_leaves_the_others_a_partial_report_within_the_timeout(tmp_path):
    """SIGKILL leaves no word: rank 0's next collective fails (at once, or at the timeout), and rank 0 exits 2
    with one line and the profile's partial report."""
    import time
    began = time.monotonic()
    codes, results, output = run_ranks("ddp_hot_killed_in_trials", tmp_path, timeout_s=8)
    assert codes[0] == 2 and codes[1] == -9, results
    assert "rank 0: the trials' all-reduce failed" in results[0][1] and "Traceback" not in results[0][1]
    assert time.monotonic() - began < 60
    doc = Report.from_json(output)
    assert doc["gate"]["exit_code"] == 2 and doc["gate"]["unfinished"].startswith("rank 0: the trials' all-reduce")


@pytest.mark.parametrize("strategy, extra", [("ddp", ()), ("fsdp", ()), ("fsdp", ("--trial-states", "cpu"))])
def test_trials_under_the_cli_give_every_rank_the_same_exit_code(tmp_path, strategy, extra):
    codes, results, output = run_ranks(f"{strategy}_hot", tmp_path, *extra)
    assert codes == [1, 1], results  # errors: the profile diverges, and so does the trials' unclipped run
    doc = Report.from_json(output)
    trials = doc["recommendation"]["trials"]
    assert trials is not None and doc["recommendation"]["threshold"] == trials["winner"]


def test_ranks_that_would_train_different_trials_stop_before_they_can_hang(tmp_path):
    ranks = run_api_ranks("disagree", tmp_path)
    assert all(r["error"] and r["error"].startswith("the ranks disagree on the next trial") for r in ranks)
    assert "clip at 1 to 30 steps on rank 0" in ranks[0]["error"] and "clip at 0.1" in ranks[1]["error"]


def test_a_rank_that_raises_in_a_trial_stops_every_rank_without_a_hang(tmp_path):
    """Rank 1's loss raises inside the trials; rank 0 waits in a collective until the timeout. Both return
    with one line (a hang would end only at HANG_S, and fail there)."""
    codes, results, output = run_ranks("ddp_hot_raises_in_trials", tmp_path, timeout_s=8)
    assert codes == [2, 2], results
    assert "rank 1: " in results[1][1] and "rank one ran out of memory in a trial" in results[1][1]
    assert "rank 0: rank 1 stopped first: " in results[0][1] and "in a trial" in results[0][1]
    assert all("Traceback" not in err for _, err in results)
    doc = Report.from_json(output)  # rank 0's partial report: the profile, and why the run did not finish
    assert doc["gate"]["exit_code"] == 2 and "rank 1 stopped first" in doc["gate"]["unfinished"]
    assert doc["steps"] == 6 and doc["recommendation"]["trials"] is None


def test_findings_give_every_rank_the_same_exit_code(tmp_path):
    rules = tmp_path / "always.yaml"
    rules.write_text("rules:\n  - id: always\n    severity: error\n    scope: model\n"
                     "    when: {metric: steps, op: '>', value: 0}\n    message: always\n")
    codes, _, output = run_ranks("ddp", tmp_path, "--rules", str(rules))
    assert codes == [1, 1]
    assert Report.from_json(output)["gate"]["exit_code"] == 1


def test_a_rank_that_fails_to_build_stops_every_rank_naming_it(tmp_path):
    codes, results, output = run_ranks("fails_on_rank_1", tmp_path, timeout_s=8)
    assert codes == [2, 2]
    for _, err in results:
        assert "rank 1 failed" in err and "rank one cannot build its model" in err and "Traceback" not in err
    assert not output.exists()


def test_the_rank_that_hosts_the_store_waits_until_every_rank_has_read_the_verdict(tmp_path):
    codes, results, _ = run_ranks("fails_on_rank_1_and_reads_slowly", tmp_path, timeout_s=8)
    assert codes == [2, 2], results
    for _, err in results:
        assert "rank 1 failed" in err and "rank one cannot build its model" in err and "Traceback" not in err


def test_a_rank_that_raises_midway_does_not_hang(tmp_path):
    """Both ranks return, each with its one-line error (a hang would end only at HANG_S, and fail there)."""
    codes, results, _ = run_ranks("raises_midway_on_rank_1", tmp_path, timeout_s=8)
    assert codes == [2, 2]
    assert "rank 1: the forward pass or loss raised at step 2" in results[1][1]
    assert results[0][1].startswith("gradscope: error: rank 0:") or "rank 0:" in results[0][1]


@pytest.mark.parametrize("dying", [1, 0])
def test_a_rank_that_dies_under_torchrun_is_named_in_rank_0s_partial_report(tmp_path, dying):
    # A plain DDP loop under the real torchrun; one rank raises at step 5. The others fail inside DDP's
    # all-reduce (or get torchrun's SIGTERM); rank 0 writes the report without collectives, naming both.
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(HERE / "dist_recorder.py"), str(out), str(dying), "5"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "could not be written" not in done.stderr, done.stderr[-2000:]
    doc = Report.from_json(out)
    assert doc["partial"] is True and doc["steps"] == 5 and doc["ranks"] == 2
    first = f"rank {dying} stopped first: the training loop raised RuntimeError: a corrupt shard on rank {dying}, " \
            "after 5 observed steps"
    if dying == 1:  # rank 1 left its word before it exited; rank 0 failed in the all-reduce after it
        assert doc["stopped_reason"].startswith(first + "; then rank 0: the training loop raised")
    else:  # rank 0 wrote first, while rank 1 still waited in the all-reduce
        assert doc["stopped_reason"] == first
    assert doc["gate"]["exit_code"] == 2 and len(doc["layers"]) == 4


def test_the_distributed_pages_torchrun_command_runs_as_written(tmp_path):
    """docs/distributed.md's torchrun command on its my_experiment.py, under the real torchrun (given a free
    port, so that it cannot meet another run's): every rank exits 0 and rank 0 writes a 2-rank report."""
    import re
    import shlex
    page = (HERE.parent / "docs" / "distributed.md").read_text(encoding="utf-8")
    command = re.search(r"```bash\n(torchrun [^\n]*)\n```", page).group(1)
    experiment = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if b.startswith("# my_experiment.py"))
    (tmp_path / "my_experiment.py").write_text(experiment, encoding="utf-8")
    args = shlex.split(command)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), *args[1:]]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    doc = Report.from_json(tmp_path / args[args.index("--output") + 1])
    assert doc["ranks"] == 2 and doc["steps"] >= 30 and not doc["partial"]


def test_a_steps_collective_is_left_in_flight_until_its_figures_are_read(tmp_path):
    # Rank 1 comes to each observe() half a second late: rank 0's observe() does not wait for it, and
    # the figures read later are the whole ones. A collective that never ends (rank 1 left) costs rank
    # 0's report alone that one step, after a bounded wait, and no more.
    out = tmp_path / "inflight.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(HERE / "dist_inflight.py"), str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert max(doc["observe_s"]) < 0.25, doc["observe_s"]  # rank 1 came 0.5 s late each time
    assert doc["norms"] == pytest.approx(doc["local"], rel=1e-5)
    assert doc["steps_alone"] == 4 and doc["settle_s"] < 10
