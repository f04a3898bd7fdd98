"""Held-out scenarios: architectures and optimizers that no choice in gradscope's advice was made on.

The scenarios in ``scenarios.py`` are the ones the advice's rules were compared on (``choose.py``
replays their trials), so a score there is partly a score of that choice. These are not: each was
written once, its learning rate set only so that its label holds (unclipped training diverges or
stalls, or trains well), checked on the grid alone, before gradscope's advice was run on it, and no
rule or constant of the advice is changed to fit them. ``run.py --set heldout`` scores them; a
failure here is reported, not tuned away.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from scenarios import (STEPS, VOCAB, Batch, GRUClassifier, Scenario, Setup, _hf_lm_loss, _stream, adding_problem,
                       cross_entropy, markov_rows, mse, wave_images)


# -- a residual CNN with batch norm ------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def resnet(c: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         Residual(c), nn.MaxPool2d(2), Residual(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, 4))


def _resnet_at(seed: int, lr: float) -> Setup:
    """The 2-block ResNet (batch norm) on 3-channel images at SGD with momentum 0.9."""
    torch.manual_seed(seed)
    train, held_out = _stream(wave_images(channels=3), seed, STEPS)
    model = resnet()
    return Setup(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


def resnet_hot(seed: int) -> Setup:
    return _resnet_at(seed, 20.0)


def resnet_healthy(seed: int) -> Setup:
    return _resnet_at(seed, 0.05)


# -- recurrent and temporal-convolution models ----------------------------------------------------------
def gru_lr50(seed: int) -> Setup:
    """A GRU on the adding problem at SGD lr 50: the loss blows up within the first steps."""
    torch.manual_seed(seed)
    model = GRUClassifier()
    train, held_out = _stream(adding_problem, seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=50.0), train, held_out, mse, STEPS)


def gru_adam_healthy(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = GRUClassifier()
    train, held_out = _stream(adding_problem, seed, STEPS)
    return Setup(model, torch.optim.Adam(model.parameters(), lr=3e-3), train, held_out, mse, STEPS)


class TCN(nn.Module):
    """Dilated causal 1-D convolutions (no normalisation) over the adding problem's sequence."""

    def __init__(self, c: int = 32, levels: int = 5) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(2 if k == 0 else c, c, 2, dilation=2 ** k) for k in range(levels))
        self.head = nn.Linear(c, 1)

    def forward(self, x):
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = torch.relu(conv(nn.functional.pad(h, (conv.dilation[0], 0))))
        return self.head(h[:, :, -1])


def tcn_hot(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = TCN()
    train, held_out = _stream(adding_problem, seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9), train, held_out, mse, STEPS)


# -- a feed-forward classifier --------------------------------------------------------------------------
def spirals(batch: int = 64, arms: int = 3):
    def make(g: torch.Generator) -> Batch:
        labels = torch.randint(0, arms, (batch,), generator=g)
        r = torch.rand(batch, generator=g)
        theta = 4 * r + labels.float() * 2 * math.pi / arms + 0.2 * torch.randn(batch, generator=g)
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1), labels
    return make


def mlp_momentum_hot(seed: int) -> Setup:
    """A 4-layer GELU MLP classifying spirals at SGD lr 5, momentum 0.9."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128),
                          nn.GELU(), nn.Linear(128, 3))
    train, held_out = _stream(spirals(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


# -- a vision transformer and a Hugging Face model the advice never saw ----------------------------------
class TinyViT(nn.Module):
    def __init__(self, d: int = 64, patch: int = 4, size: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, images):
        x = self.patches(images).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(x).mean(1))


def vit_hot(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = TinyViT()
    train, held_out = _stream(wave_images(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


def _neox(seed: int) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                           hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(config)


def neox_hot(seed: int) -> Setup:
    """Hugging Face GPT-NeoX (2 layers, 64 wide) from its config at SGD lr 3, momentum 0.9."""
    model = _neox(seed)
    train, held_out = _stream(markov_rows(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9), train, held_out,
                 _hf_lm_loss, STEPS)


def neox_healthy(seed: int) -> Setup:
    model = _neox(seed)
    train, held_out = _stream(markov_rows(), seed, STEPS)
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3), train, held_out, _hf_lm_loss, STEPS)


# -- written for the trials' horizon: a cliff, a slow learner and a convolutional family the sets lack --------
# Written once, before the adaptive horizon ran on them; each learning rate set on the grid alone.
def sine_regression(d_in: int = 16, batch: int = 64):
    def make(g: torch.Generator) -> Batch:
        x = torch.randn(batch, d_in, generator=g)
        return x, torch.sin(2 * x[:, :4]).sum(1, keepdim=True) + 0.5 * x[:, 4:8].pow(2).sum(1, keepdim=True)
    return make


def relu_mlp_cliff(seed: int) -> Setup:
    """An 8-layer ReLU MLP (no normalisation) on a non-linear regression at SGD lr 0.05, momentum 0.9:
    looser thresholds learn faster at first, and the edge of stability sits just above the best one."""
    torch.manual_seed(seed)
    layers, width = [], 64
    for k in range(8):
        layers += [nn.Linear(16 if k == 0 else width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    train, held_out = _stream(sine_regression(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), train, held_out, mse, STEPS)


class RecallLSTM(nn.Module):
    """Reads a sequence and names the class of its first token: the answer is 40 steps back."""

    def __init__(self, vocab: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


def recall_tokens(length: int = 8, batch: int = 32, vocab: int = 8):
    def make(g: torch.Generator) -> Batch:
        tokens = torch.randint(4, vocab, (batch, length), generator=g)  # noise tokens 4..7
        labels = torch.randint(0, 4, (batch,), generator=g)
        tokens[:, 0] = labels  # the first token carries the class
        return tokens, labels
    return make


def lstm_recall_slow(seed: int) -> Setup:
    """An LSTM recalling the first of 40 tokens at SGD lr 20: a slow learner, whose gain comes late."""
    torch.manual_seed(seed)
    model = RecallLSTM()
    train, held_out = _stream(recall_tokens(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=10.0), train, held_out, cross_entropy, STEPS)


class Separable(nn.Module):
    """A MobileNet block: depthwise 3x3, batch norm, ReLU6, pointwise 1x1, batch norm, ReLU6."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                                  nn.ReLU6(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())

    def forward(self, x):
        return self.body(x)


def mobilenet_hot(seed: int) -> Setup:
    """A 4-block depthwise-separable CNN (MobileNet v1's block) on 3-channel images at SGD lr 10, momentum 0.9."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          Separable(16, 32), Separable(32, 32, 2), Separable(32, 64), Separable(64, 64, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))
    train, held_out = _stream(wave_images(channels=3), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=10.0, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


HELDOUT: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("resnet_hot", "explode", resnet_hot, "2-block ResNet with batch norm at SGD lr 20"),
    Scenario("gru_lr50", "explode", gru_lr50, "GRU on the adding problem at SGD lr 50"),
    Scenario("tcn_hot", "explode", tcn_hot, "dilated causal 1-D CNN at SGD lr 5"),
    Scenario("mlp_momentum_hot", "explode", mlp_momentum_hot, "4-layer GELU MLP on spirals at SGD lr 5"),
    Scenario("vit_hot", "explode", vit_hot, "2-layer ViT on images at SGD lr 1"),
    Scenario("hf_neox_hot", "explode", neox_hot, "Hugging Face GPT-NeoX from its config at SGD lr 3"),
    Scenario("resnet_healthy", "healthy", resnet_healthy, "the ResNet at SGD lr 0.05"),
    Scenario("gru_adam_healthy", "healthy", gru_adam_healthy, "the GRU at Adam 3e-3"),
    Scenario("hf_neox_healthy", "healthy", neox_healthy, "GPT-NeoX at AdamW 1e-3"),
    Scenario("relu_mlp_cliff", "explode", relu_mlp_cliff, "8-layer ReLU MLP at SGD lr 0.05, momentum 0.9"),
    Scenario("lstm_recall_slow", "explode", lstm_recall_slow, "LSTM recalling a token 40 steps back at SGD lr 20"),
    Scenario("mobilenet_hot", "explode", mobilenet_hot, "depthwise-separable CNN at SGD lr 10, momentum 0.9"),
]}
