"""diagnose() through the Python API on every rank of a process group, each rank writing its own trial table
(tests/test_distributed.py starts the ranks as torchrun would).

Usage: python tests/dist_trials.py CALLABLE OUTPUT_PREFIX   (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)
"""
from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_target  # noqa: E402
import gradscope  # noqa: E402


def table(report: gradscope.Report) -> dict:
    """What a rank's trials did: every trial's record and the winner, exactly as floats."""
    trials = report.recommendation.evidence.trials
    if trials is None:
        return {"trials": None, "method": report.recommendation.method,
                "threshold": report.recommendation.threshold}
    runs = [{"threshold": t.threshold, "losses": list(t.losses), "held_out": t.held_out,
             "held_out_batches": list(t.held_out_batches), "unstable": t.unstable,
             "checkpoints": [[c.steps, c.held_out] for c in t.checkpoints]}
            for t in (trials.reference, *trials.trials)]
    return {"trials": runs, "winner": trials.winner, "spent": trials.spent, "state_bytes": trials.state_bytes,
            "method": report.recommendation.method,
            "threshold": report.recommendation.threshold,
            "findings": sorted(f.rule_id for f in report.findings)}


def disagree(prefix: str) -> None:
    """Each rank asks to train another threshold: the trials' agreement check must stop both, with one line."""
    import torch
    from gradscope.errors import GradscopeError
    from gradscope.run.trials import same_on_every_rank
    try:
        same_on_every_rank(1.0 if dist.get_rank() == 0 else 0.1, 30, torch.device("cpu"))
        said = None
    except GradscopeError as exc:
        said = exc.problem
    Path(f"{prefix}.{dist.get_rank()}.json").write_text(json.dumps({"error": said}))


def main(name: str, prefix: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    if name == "disagree":
        disagree(prefix)
        dist.destroy_process_group()
        return
    report = gradscope.diagnose(getattr(dist_target, name)(), steps=30, seed=0, profile=gradscope.ProfileOptions(
        device="cpu"))
    Path(f"{prefix}.{dist.get_rank()}.json").write_text(json.dumps(table(report), default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
