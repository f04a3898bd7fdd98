"""Every Python block in README.md and docs/ runs, page by page, in the order a reader meets them.

Blocks on one page share a namespace, as a reader's session would. Where a block uses names from the
reader's own code (``model``, ``optimizer``, ``loader``, ``compute_loss``, ``experiment``, a Lightning
``datamodule``, a Hugging Face ``data`` set), a small real stand-in is defined first: a plain
``nn.Module`` loop (also for an Accelerate loop), a ``LightningModule``, or a tiny GPT-2 built from
its config, chosen by the framework the block itself uses. A block whose first line names a file (``# my_experiment.py``) is
also saved under that name, as the reader would save it. Each page runs in its own empty folder.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import gradscope
from conftest import HANG_S

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks(page: Path):
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def a_plain_loop() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = [(torch.randn(32, 16), torch.randn(32, 1)) for _ in range(8)]

    def compute_loss(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])
    monitor = gradscope.Monitor(model)
    for batch in loader[:4]:
        optimizer.zero_grad()
        loss = compute_loss(model, batch)
        loss.backward()
        monitor.observe(loss)
        optimizer.step()
    return {"torch": torch, "nn": nn, "gradscope": gradscope, "model": model, "optimizer": optimizer,
            "loader": loader, "compute_loss": compute_loss, "monitor": monitor,
            "experiment": gradscope.Experiment(model, optimizer, loader, loss_fn=compute_loss)}


def a_lightning_module() -> dict:
    pl = pytest.importorskip("lightning.pytorch")

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return {"model": Regressor(), "datamodule": torch.utils.data.DataLoader(data, batch_size=8)}


def a_hugging_face_model() -> dict:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=16))
    ids = torch.randint(0, 64, (32, 16))
    return {"model": model, "data": [{"input_ids": row, "labels": row} for row in ids]}


def stand_ins(code: str) -> dict:
    if "pl.Trainer(" in code and ".fit(" in code:
        return a_lightning_module()
    if "train_dataset=data" in code:
        return a_hugging_face_model()
    if "Accelerator(" in code:  # a plain loop's model, optimizer and data, as Accelerate takes them
        return a_plain_loop()
    return {}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = a_plain_loop()
    found = blocks(page)
    for k, code in enumerate(found):
        first = code.splitlines()[0]
        named = re.fullmatch(r"# (\w+\.py)", first)
        if named:
            (tmp_path / named.group(1)).write_text(code, encoding="utf-8")
        namespace.update(stand_ins(code))
        if "loss.backward()" in code and "accelerator" in namespace and "accelerator" not in code:
            namespace.update(a_plain_loop())  # a plain loop after an Accelerate one: its prepared optimizer is spent
        try:
            exec(compile(code, f"{page.name} block {k + 1}", "exec"), namespace)  # noqa: S102 - the docs' own code
        finally:
            _forget_the_accelerator()


def _forget_the_accelerator() -> None:
    """Accelerate keeps one state per process; a page's Accelerator must not configure the next test's."""
    import sys
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_the_pages_have_python_to_run():
    """The harness above would pass on pages it never found: it must find the blocks it is meant to run."""
    counts = {page.name: len(blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 1 and counts["python-api.md"] >= 3 and counts["integrations.md"] >= 6


def test_the_readme_experiment_is_healthy_as_the_ci_page_tests_it(tmp_path, monkeypatch):
    """docs/ci.md's pytest example, run on the README's my_experiment.py."""
    monkeypatch.chdir(tmp_path)
    readme = blocks(ROOT / "README.md")[0]
    (tmp_path / "my_experiment.py").write_text(readme, encoding="utf-8")
    namespace: dict = {}
    exec(compile(blocks(ROOT / "docs" / "ci.md")[0], "ci.md", "exec"), namespace)
    namespace["test_gradients_are_healthy"]()


def test_the_ci_pages_baseline_command_runs_as_written(tmp_path):
    """docs/ci.md's `gradscope diagnose my_experiment.py --write-baseline ...`, on the README's experiment."""
    import os
    import shlex
    import subprocess
    import sys
    command = re.search(r"```bash\n(gradscope diagnose [^\n]*--write-baseline[^\n]*)\n```",
                        (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")).group(1)
    (tmp_path / "my_experiment.py").write_text(blocks(ROOT / "README.md")[0], encoding="utf-8")
    args = shlex.split(command)
    done = subprocess.run([sys.executable, "-m", "gradscope", *args[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / args[-1]).exists()


def test_the_rules_page_lists_every_default_rule():
    """docs/rules.md names the default set; a rule added to rules/default.yaml is added there too."""
    from gradscope import load_rules
    page = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    listed = page[page.index("The default set"):page.index("`gradscope rules` describes each.")]
    assert re.findall(r"`([a-z0-9-]+)`", listed) == [r.id for r in load_rules().rules]


def test_the_readme_is_a_short_door_with_the_monitor_and_the_clipper_in_code():
    """The README is for the person who wants to use gradscope: under 250 lines, and its Python shows the
    Monitor in a loop and the Clipper applying the advice (the contributor's material is docs/development.md)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    code = "\n".join(BLOCK.findall(text))
    assert "monitor.observe(" in code and "gradscope.Monitor(" in code
    assert "gradscope.Clipper." in code and "clipper(model" in code
