"""Labelled scenarios for the evaluation: data generated in code, each trains in seconds on 2 cores.

A scenario builds, for a seed, a fresh model and optimizer and a deterministic data stream: the same
seed gives the same initial weights and the same batch at every step, so every clipping method sees
exactly the same run but for its clipping. ``label`` is "explode" (unclipped training diverges and
some threshold rescues it), "healthy" (nothing to flag) or "other" (clipping is not the cure).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

Batch = tuple
STEPS = 300  # every scenario trains this long: 10x a 30-step profile or trial
VOCAB = 64  # the token models' vocabulary: small enough that a bigram table is learnt within STEPS


@dataclasses.dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_batch: Callable[[int], Batch]  # step -> batch, the same for every method
    eval_batches: List[Batch]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    steps: int
    scheduler: Optional[object] = None  # stepped after every optimizer step (the long set's warm-up and decay)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    build: Callable[[int], Setup]
    note: str


def _stream(make: Callable[[torch.Generator], Batch], seed: int, steps: int, n_eval: int = 4):
    g = torch.Generator().manual_seed(1000 + seed)
    train = [make(g) for _ in range(steps)]
    held_out = [make(g) for _ in range(n_eval)]
    return (lambda step: train[step % len(train)]), held_out


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def cross_entropy(model, batch):
    logits = model(batch[0])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


# -- recurrent --------------------------------------------------------------------------------------------
class TanhRNN(nn.Module):
    def __init__(self, radius: float, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            w = torch.randn(hidden, hidden)
            self.rnn.weight_hh_l0.copy_(w * radius / torch.linalg.eigvals(w).abs().max())

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def adding_problem(g: torch.Generator, length: int = 40, batch: int = 32) -> Batch:
    values = torch.rand(batch, length, generator=g)
    marks = torch.zeros(batch, length)
    picks = torch.stack([torch.randperm(length, generator=g)[:2] for _ in range(batch)])
    marks.scatter_(1, picks, 1.0)
    return torch.stack([values, marks], -1), (values * marks).sum(1, keepdim=True)


def exploding_rnn(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = TanhRNN(radius=1.2)
    train, held_out = _stream(adding_problem, seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05), train, held_out, mse, STEPS)


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, size: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, size)
        self.lstm = nn.LSTM(size, size, 2)
        self.out = nn.Linear(size, vocab)
        for w in (self.embed.weight, self.out.weight):
            nn.init.uniform_(w, -0.1, 0.1)

    def forward(self, tokens):
        return self.out(self.lstm(self.embed(tokens))[0])


def markov_tokens(vocab: int = VOCAB, length: int = 20, batch: int = 16):
    """Batches of a random sparse Markov chain: real structure to learn."""
    def make(g: torch.Generator) -> Batch:
        if not hasattr(make, "cdf"):
            tg = torch.Generator().manual_seed(7)
            probs = torch.rand(vocab, vocab, generator=tg) ** 8
            make.cdf = torch.cumsum(probs / probs.sum(1, keepdim=True), 1)
        x = torch.empty(length + 1, batch, dtype=torch.long)
        x[0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, length + 1):
            u = torch.rand(batch, 1, generator=g)
            x[t] = torch.searchsorted(make.cdf[x[t - 1]], u).squeeze(1).clamp(max=vocab - 1)
        return x[:-1], x[1:]
    return make


def lstm_lm_hot(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = LSTMLM(size=128)
    train, held_out = _stream(markov_tokens(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=150.0), train, held_out, cross_entropy, STEPS)


def healthy_lstm(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = LSTMLM()
    train, held_out = _stream(markov_tokens(), seed, STEPS)
    return Setup(model, torch.optim.Adam(model.parameters(), lr=3e-3), train, held_out, cross_entropy, STEPS)


# -- feed-forward -----------------------------------------------------------------------------------------
def regression(d_in: int = 16, scale: float = 1.0, batch: int = 64, outlier_every: int = 0,
               outlier_scale: float = 30.0):
    w = torch.randn(d_in, 1, generator=torch.Generator().manual_seed(3))
    count = [0]

    def make(g: torch.Generator) -> Batch:
        x = torch.randn(batch, d_in, generator=g)
        count[0] += 1
        if outlier_every and count[0] % outlier_every == 0:
            x = x * outlier_scale  # a batch of outlier inputs
        return x, torch.sin(x @ w) * scale + 0.1 * torch.randn(batch, 1, generator=g)
    return make


def deep_relu(depth: int = 12, width: int = 64, d_in: int = 16) -> nn.Module:
    layers, size = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(width, 1))


def deep_mlp_large_targets(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = deep_relu()
    train, held_out = _stream(regression(scale=100.0), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), train, held_out, mse, STEPS)


def outlier_batches(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    train, held_out = _stream(regression(outlier_every=17), seed, STEPS)
    clean_eval = _stream(regression(), seed + 50, 1)[1]
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train, clean_eval, mse, STEPS)


def overclip_trap(seed: int) -> Setup:
    """Healthy, but its gradient norms sit near 1e3: a fixed threshold of 1.0 cripples it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    train, held_out = _stream(regression(scale=300.0), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=2e-5, momentum=0.9), train, held_out, mse, STEPS)


def healthy_cnn(seed: int) -> Setup:
    torch.manual_seed(seed)

    def block(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.MaxPool2d(2))
    model = nn.Sequential(block(1, 8), block(8, 16), nn.Flatten(), nn.Linear(16 * 16, 4))
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")

    def make(g):
        labels = torch.randint(0, 4, (32,), generator=g)
        angle = labels.float() * math.pi / 4
        waves = torch.sin(0.8 * (xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]))
        return (waves + 0.5 * torch.randn(32, 16, 16, generator=g)).unsqueeze(1), labels
    train, held_out = _stream(make, seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


# -- transformers -----------------------------------------------------------------------------------------
class TinyGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 64, seq: int = 20) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        tokens = tokens.t()  # the token stream is time-major
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.out(self.blocks(x, mask=self.mask, is_causal=True)).transpose(0, 1)


def hot_transformer(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = TinyGPT()
    train, held_out = _stream(markov_tokens(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


def healthy_transformer(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = TinyGPT()
    train, held_out = _stream(markov_tokens(), seed, STEPS)
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3), train, held_out, cross_entropy, STEPS)


# -- clipping is not the cure -----------------------------------------------------------------------------
def dead_relu(seed: int) -> Setup:
    """A ReLU net whose first layer's biases were initialised far negative: every unit is dead."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    train, held_out = _stream(regression(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.01), train, held_out, mse, STEPS)


# -- more recurrent and convolutional models ---------------------------------------------------------------
class GRUClassifier(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def gru_hot(seed: int) -> Setup:
    """A GRU on the adding problem at SGD lr 5: gradients blow up within the first steps."""
    torch.manual_seed(seed)
    model = GRUClassifier()
    train, held_out = _stream(adding_problem, seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=5.0), train, held_out, mse, STEPS)


def wave_images(channels: int = 1, size: int = 16, classes: int = 4, batch: int = 32):
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")

    def make(g):
        labels = torch.randint(0, classes, (batch,), generator=g)
        angle = labels.float() * math.pi / classes
        waves = torch.sin(0.8 * (xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]))
        images = (waves + 0.5 * torch.randn(batch, size, size, generator=g)).unsqueeze(1)
        return images.expand(-1, channels, -1, -1), labels
    return make


def deep_cnn_no_norm(seed: int) -> Setup:
    """An 8-conv plain CNN (no normalisation, no residuals) at SGD lr 0.1, momentum 0.9."""
    torch.manual_seed(seed)
    layers, c = [], 1
    for k in range(8):
        layers += [nn.Conv2d(c, 16, 3, padding=1), nn.ReLU()]
        c = 16
        if k in (3, 7):
            layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    train, held_out = _stream(wave_images(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), train, held_out,
                 cross_entropy, STEPS)


def adam_outliers(seed: int) -> Setup:
    """An MLP under AdamW where 1 batch in 23 has inputs x100: clipping matters only for the spikes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))
    train, held_out = _stream(regression(outlier_every=23, outlier_scale=100.0), seed, STEPS)
    clean_eval = _stream(regression(), seed + 50, 1)[1]
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=3e-3), train, clean_eval, mse, STEPS)


# -- Hugging Face models built from their configs (no download) -------------------------------------------
def _hf_lm_loss(model, batch):
    return model(input_ids=batch[0], labels=batch[0]).loss


def _hf_mlm_loss(model, batch):
    return model(input_ids=batch[0], labels=batch[1]).loss


def markov_rows(batch: int = 16, length: int = 20):
    chain = markov_tokens(batch=batch, length=length)

    def make(g):
        x, _ = chain(g)
        return (x.t().contiguous(),)  # batch-major rows of tokens
    return make


def masked_rows(mask_id: int = VOCAB - 1, rate: float = 0.15):
    rows = markov_rows()

    def make(g):
        (x,) = rows(g)
        masked = torch.rand(x.shape, generator=g) < rate
        labels = torch.where(masked, x, torch.full_like(x, -100))
        return torch.where(masked, torch.full_like(x, mask_id), x), labels
    return make


def gpt2_hot(seed: int) -> Setup:
    """Hugging Face GPT-2 (2 layers, 64 wide) at SGD lr 3, momentum 0.9."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    train, held_out = _stream(markov_rows(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=3.0, momentum=0.9), train, held_out,
                 _hf_lm_loss, STEPS)


def bert_hot(seed: int) -> Setup:
    """Hugging Face BERT masked LM (2 layers, 64 wide) at SGD lr 0.5, momentum 0.9."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = BertForMaskedLM(config)
    train, held_out = _stream(masked_rows(), seed, STEPS)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), train, held_out,
                 _hf_mlm_loss, STEPS)


def llama_healthy(seed: int) -> Setup:
    """Hugging Face Llama (2 layers, 64 wide) at AdamW lr 1e-3: healthy."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config)
    train, held_out = _stream(markov_rows(), seed, STEPS)
    return Setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3), train, held_out, _hf_lm_loss, STEPS)


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("rnn_spectral_radius", "explode", exploding_rnn, "tanh RNN, recurrent spectral radius 1.2 (Pascanu 2013)"),
    Scenario("lstm_lm_hot", "explode", lstm_lm_hot, "2-layer LSTM LM (128 wide) at SGD lr 150"),
    Scenario("deep_relu_large_targets", "other", deep_mlp_large_targets,
             "12-layer ReLU MLP, no norm, targets x100: no threshold gets below the initial loss"),
    Scenario("outlier_batches", "explode", outlier_batches, "1 batch in 17 has inputs x30"),
    Scenario("hot_transformer", "explode", hot_transformer, "2-layer transformer at SGD lr 3"),
    Scenario("overclip_trap", "healthy", overclip_trap, "healthy, gradient norms near 1e3"),
    Scenario("healthy_cnn", "healthy", healthy_cnn, "CNN with BatchNorm"),
    Scenario("healthy_lstm", "healthy", healthy_lstm, "LSTM LM at Adam 3e-3"),
    Scenario("gru_lr5", "explode", gru_hot, "GRU on the adding problem at SGD lr 5"),
    Scenario("deep_cnn_no_norm", "explode", deep_cnn_no_norm, "8-conv CNN without normalisation, SGD lr 0.1"),
    Scenario("adam_outliers", "explode", adam_outliers, "MLP under AdamW, 1 batch in 23 has inputs x100"),
    Scenario("hf_gpt2_hot", "explode", gpt2_hot, "Hugging Face GPT-2 from its config, SGD lr 3"),
    Scenario("hf_bert_hot", "other", bert_hot, "Hugging Face BERT MLM from its config, SGD lr 0.5: diverges "
             "unclipped, but no threshold trains it within 300 steps (the grid's best is within 1% of l0)"),
    Scenario("hf_llama_healthy", "healthy", llama_healthy, "Hugging Face Llama from its config, AdamW 1e-3"),
    Scenario("healthy_transformer", "healthy", healthy_transformer, "transformer at AdamW 1e-3"),
    Scenario("dead_relu", "other", dead_relu, "every ReLU dead at init: clipping cannot help"),
]}
