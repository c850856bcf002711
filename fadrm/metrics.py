"""Top-k accuracy of a model on a labelled image set."""

from __future__ import annotations

import torch

from fadrm.amp import autocast, is_channels_last, to_layout
from fadrm.data import ImageSet, normalize
from fadrm.training import all_reduce_sum


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: ImageSet,
    mean: list[float],
    std: list[float],
    device: torch.device,
    batch_size: int = 512,
    mixed_precision: bool = True,
    sharded: bool = False,
) -> tuple[float, float]:
    """(top-1, top-5) accuracy in percent; the model is put in eval mode and restored.

    ``sharded``: ``data`` is this rank's share of the set, and the counts are summed over
    the torch.distributed ranks (exact: the numbers one rank would get on the whole set).
    """
    counts = torch.tensor(correct_counts(model, data, mean, std, device, batch_size,
                                         mixed_precision), dtype=torch.float64)
    if sharded:
        counts = all_reduce_sum(counts, device)
    correct1, correct5, n = counts.tolist()
    n = max(n, 1)
    return 100.0 * correct1 / n, 100.0 * correct5 / n


@torch.no_grad()
def correct_counts(
    model: torch.nn.Module,
    data: ImageSet,
    mean: list[float],
    std: list[float],
    device: torch.device,
    batch_size: int = 512,
    mixed_precision: bool = True,
) -> tuple[int, int, int]:
    """(top-1 correct, top-5 correct, images): counts, so shards of a set can be summed."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    k = min(5, data.num_classes)
    nhwc = is_channels_last(model)  # feed the model its own layout
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start : start + batch_size].to(device), mean, std)
        y = data.labels[start : start + batch_size].to(device)
        with autocast(device, mixed_precision):
            logits = model(to_layout(x, nhwc))
        topk = logits.float().topk(k, dim=1).indices
        correct1 += (topk[:, 0] == y).sum().item()
        correct5 += (topk == y[:, None]).any(dim=1).sum().item()
    model.train(was_training)
    return int(correct1), int(correct5), len(data)
