"""A small CNN with BatchNorm, trained with SGD and momentum on synthetic images: healthy gradients.

The images are generated in code: each class is an oriented stripe pattern under noise.
Run: gradscope diagnose samples/healthy_cnn.py   (exit 0)
"""
import math

import torch
from torch import nn

import gradscope

CLASSES, SIZE, BATCH = 4, 16, 64


def small_cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), nn.Flatten(),
                         nn.Linear(64 * (SIZE // 8) ** 2, CLASSES))


def stripe_batches(generator: torch.Generator):
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")

    def batch():
        labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        angles = labels.float() * math.pi / CLASSES
        phase = torch.rand(BATCH, 1, 1, generator=generator) * 2 * math.pi
        waves = torch.sin(0.8 * (xs * torch.cos(angles)[:, None, None] + ys * torch.sin(angles)[:, None, None]) + phase)
        images = waves + 0.5 * torch.randn(BATCH, SIZE, SIZE, generator=generator)
        return images.unsqueeze(1), labels
    return batch


def experiment() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = small_cnn()
    return gradscope.Experiment(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        batches=stripe_batches(torch.Generator().manual_seed(0)),
        loss_fn=lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1]),
        name="healthy_cnn (3 conv blocks with BatchNorm, SGD)",
    )
