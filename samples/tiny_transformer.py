"""A small causal transformer at a sane AdamW learning rate: healthy gradients.

Two pre-norm decoder layers (d_model 64, 4 heads) learn to continue sequences generated in code by a
repeating-pattern process. Run: gradscope diagnose samples/tiny_transformer.py   (exit 0)
"""
import torch
from torch import nn

import gradscope

VOCAB, D_MODEL, HEADS, LAYERS, SEQ, BATCH = 64, 64, 4, 2, 32, 16


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.position = nn.Embedding(SEQ, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.blocks(x, mask=self.causal[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def pattern_batches(generator: torch.Generator):
    """Each sequence repeats a random motif of 3 to 8 tokens; the model learns to copy it forward."""
    def batch():
        rows = []
        for _ in range(BATCH):
            period = int(torch.randint(3, 9, (1,), generator=generator))
            motif = torch.randint(0, VOCAB, (period,), generator=generator)
            rows.append(motif.repeat(SEQ // period + 2)[: SEQ + 1])
        seqs = torch.stack(rows)
        return seqs[:, :-1], seqs[:, 1:]
    return batch


def experiment() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = TinyTransformer()
    return gradscope.Experiment(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01),
        batches=pattern_batches(torch.Generator().manual_seed(0)),
        name="tiny_transformer (2-layer causal transformer, AdamW 3e-4)",
    )
