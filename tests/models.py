"""Small real models and experiments for the tests: each trains for real on generated data."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradscope
from gradscope.run.target import load_experiment


class MLP(nn.Module):
    def __init__(self, width: int = 32, depth: int = 3, d_in: int = 8, d_out: int = 1, act=torch.tanh) -> None:
        super().__init__()
        self.act = act
        sizes = [d_in] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)


def regression_batches(n: int = 16, d_in: int = 8, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, 1, generator=g)

    def batch():
        x = torch.randn(n, d_in, generator=g)
        return x, (x @ w) * scale
    return batch


def ddp_regression():
    """Under torchrun: join the gloo group; this rank, the MLP under DDP, its SGD and this rank's batches."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    model = DistributedDataParallel(MLP())
    return (dist.get_rank(), model, torch.optim.SGD(model.parameters(), lr=1e-2),
            regression_batches(seed=dist.get_rank()))


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def noise_targets(lr: float = 2.0) -> gradscope.Experiment:
    """Nothing to learn: targets independent of the inputs. Unclipped SGD at lr 2 blows up, and no clipped
    run learns measurably within 120 steps, so the trials' contenders climb to their budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g) * 3, torch.randn(16, 1, generator=g) * 3) for _ in range(200)]
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=lr), batches, loss_fn=mse,
                                name="noise_targets")


def healthy_mlp(lr: float = 1e-2, loss_scale: float = 1.0) -> gradscope.Experiment:
    torch.manual_seed(0)
    model = MLP()
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=lr), regression_batches(),
                                loss_fn=lambda m, b: loss_scale * mse(m, b), name="healthy_mlp")


class TinyLSTM(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.mid = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(torch.tanh(self.mid(out[:, -1])))


def sequence_batches(seed: int = 0, length: int = 10):
    g = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.randn(16, length, 4, generator=g)
        return x, x[:, :, 0].sum(dim=1, keepdim=True) * 0.1
    return batch


def healthy_lstm() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = TinyLSTM()
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), lr=1e-3), sequence_batches(),
                                loss_fn=mse, name="healthy_lstm")


SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def exploding_rnn() -> gradscope.Experiment:
    """The bundled sample: a tanh RNN with recurrent spectral radius 1.2 that diverges under SGD."""
    return load_experiment(str(SAMPLES / "exploding_rnn.py"))


class GRUClassifier(nn.Module):
    def __init__(self, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.gru = nn.GRU(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def sign_pattern_batches(seed: int = 0, length: int = 20):
    """Sequences whose class is the sign pattern of two input sums: 4 classes, learnable by a GRU."""
    g = torch.Generator().manual_seed(seed)

    def batch():
        x = torch.randn(32, length, 4, generator=g)
        sums = x[:, :, :2].sum(dim=1)
        return x, (sums[:, 0] > 0).long() * 2 + (sums[:, 1] > 0).long()
    return batch


def hot_gru(lr: float = 50.0) -> gradscope.Experiment:
    """A GRU classifier at SGD lr 50: the loss blows up within the first few steps, then partly settles."""
    torch.manual_seed(0)
    model = GRUClassifier()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=lr), sign_pattern_batches(),
                                loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), name="hot_gru")


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet (three stages of two basic blocks), 8 channels wide: the layer count of a real one."""

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, c = [], width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            stages.append(nn.Sequential(Block(c, c_out, 1 if i == 0 else 2), Block(c_out, c_out)))
            c = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def image_batches(seed: int = 0, size: int = 12, batch: int = 8, classes: int = 4):
    g = torch.Generator().manual_seed(seed)

    def make():
        y = torch.randint(0, classes, (batch,), generator=g)
        grid = torch.linspace(0, 3.14, size)
        waves = torch.sin(grid[None, :, None] * (y[:, None, None] + 1) + grid[None, None, :])
        return (waves + 0.3 * torch.randn(batch, size, size, generator=g))[:, None], y
    return make


def hot_resnet(lr: float = 2.0) -> gradscope.Experiment:
    """A small ResNet at SGD lr 2: large updates in many layers."""
    torch.manual_seed(0)
    model = ResNet()
    return gradscope.Experiment(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), image_batches(),
                                loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), name="resnet")


def tiny_bert(layers: int = 3):
    """A BERT masked LM built from its config (no download): the long dotted names of a real one."""
    import transformers  # a test extra; callers importorskip it
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config)
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(1, 64, (4, 16), generator=g)
        return {"input_ids": ids, "labels": ids}
    return gradscope.Experiment(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch, name="tiny_bert")


class EveryKind(nn.Module):
    """Parameters of every kind the trials and the Clipper must take: a complex one, a zero-element one, a
    frozen layer, besides plain ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.empty = nn.Parameter(torch.zeros(0))
        self.phase = nn.Parameter(torch.randn(16, dtype=torch.cfloat))
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (torch.tanh(self.a(x)) * self.phase).abs() + self.empty.sum()
        return self.b(self.frozen(h))


def every_kind(lr: float = 1.0) -> gradscope.Experiment:
    """EveryKind under SGD at a rate that blows up within 30 steps, so that the trials run."""
    torch.manual_seed(0)
    model = EveryKind()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=g) * 3, torch.randn(16, 1, generator=g) * 3) for _ in range(200)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return gradscope.Experiment(model, torch.optim.SGD(trainable, lr=lr), batches, loss_fn=mse, name="every_kind")
