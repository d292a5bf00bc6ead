"""Scoring a supernet path by its features rather than by the shared classifier.

Every path of a supernet feeds the same classifier, whose input moves a lot from path to
path (on ``fashion_mnist_cells`` the mean |input| of the shared linear head spans 15x over
12 paths that differ only in their cell ops; ``benchmarks/supernet_interference.py``). The
shared head is therefore fitted to a mixture of paths, and a path's inherited accuracy says
as much about how well that mixture suits it as about its features. A *linear probe* refits
the classifier for the path alone: a multinomial logistic regression on the path's own
features (the input of its last ``nn.Linear``) for a seeded sample of training images,
evaluated on the validation split. The path's weights and BatchNorm statistics are not
changed; the probe's weights are thrown away.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ..data import DataSplits
from ..errors import BnasError

__all__ = ["PROBE_ITERATIONS", "PROBE_L2", "classifier_inputs", "fit_probe", "probe_accuracy"]

# L-BFGS iterations and the L2 penalty on the probe's weights: enough to converge on a few
# thousand samples of at most a few hundred features, little enough to stay a second or two.
PROBE_ITERATIONS = 100
PROBE_L2 = 1e-3


def _last_linear(network: nn.Module) -> nn.Linear:
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BnasError(
            "the classifier's input is read at the last nn.Linear, but this network has no nn.Linear; "
            "end the space's head with {op: linear}"
        )
    return linears[-1]


@torch.no_grad()
def classifier_inputs(
    network: nn.Module, batches: list[tuple[Tensor, Tensor]], batch_statistics: bool = False
) -> tuple[Tensor, Tensor]:
    """The input of ``network``'s last linear layer, in eval mode (with ``batch_statistics``:
    training mode, BatchNorm on each batch's statistics), for every ``(x, y)`` of ``batches``,
    as float32 rows; and the labels. The network's mode is restored."""
    seen: list[Tensor] = []
    hook = _last_linear(network).register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].detach().float().flatten(1))
    )
    was_training = network.training
    try:
        network.train(batch_statistics)
        for x, _ in batches:
            network(x)
    finally:
        hook.remove()
        network.train(was_training)
    return torch.cat(seen), torch.cat([y for _, y in batches])


def fit_probe(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A multinomial logistic regression on standardized ``features``: ``(mean, scale,
    weight, bias)``, with ``logits = ((f - mean) / scale) @ weight + bias``. Deterministic for
    the same inputs (full-batch L-BFGS from zeros, torch's RNG unused)."""
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp_min(1e-5)
    standard = (features - mean) / scale
    weight = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe", tolerance_change=1e-7
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(standard @ weight + bias, labels) + PROBE_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return mean, scale, weight.detach(), bias.detach()


def probe_accuracy(
    network: nn.Module, data: DataSplits, samples: int, seed: int = 0, batch_size: int = 256
) -> tuple[float, float]:
    """(validation accuracy, mean cross-entropy) of a linear probe fitted on the features of
    ``samples`` training images (shuffled with ``seed``; the first ``samples``, in batches of
    ``batch_size``) of ``network`` as it is: recalibrate its BatchNorm first."""
    if samples < 1:
        raise BnasError(f"a linear probe needs at least one training sample, got {samples}")
    if not len(data.val_y):
        raise BnasError(f"{data.name}: the validation split is empty; set val_fraction above 0 to score paths")
    device = next(iter(network.parameters())).device
    train_batches = list(
        itertools.islice(
            data.loader("train", batch_size, shuffle=True, seed=seed, device=device), -(-samples // batch_size)
        )
    )
    features, labels = classifier_inputs(network, train_batches)
    features, labels = features[:samples].cpu(), labels[:samples].cpu()
    mean, scale, weight, bias = fit_probe(features, labels, data.num_classes)
    val_features, val_labels = classifier_inputs(network, list(data.loader("val", 512, device=device)))
    logits = ((val_features.cpu() - mean) / scale) @ weight + bias
    val_labels = val_labels.cpu()
    accuracy = float((logits.argmax(1) == val_labels).float().mean())
    loss = float(nn.functional.cross_entropy(logits, val_labels))
    return accuracy, loss
