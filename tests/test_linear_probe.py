"""The linear probe that scores a supernet path by its own features (bnas.search.linear_probe):
the fit against a hand-made separable problem and against scikit-learn, the features it
reads, and scoring through ``bnas.search.supernet.score``."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_CELL_SPACE
from torch import nn

from bnas.data import load_dataset
from bnas.errors import BnasError
from bnas.search import Supernet
from bnas.search.linear_probe import PROBE_L2, classifier_inputs, fit_probe, probe_accuracy
from bnas.search.space import parse_space
from bnas.search.supernet import calibration_batches, recalibrate_bn, score


def data():
    return load_dataset("synthetic", val_fraction=0.25, seed=0, shape=(1, 8, 8), num_classes=4)


def test_fit_separates_a_separable_problem_and_repeats() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    # Class k sits at 5 * e_k, with unit noise, on a large offset and scale the probe standardizes away.
    features = (nn.functional.one_hot(labels, 4).float() * 5 + torch.randn(400, 4, generator=gen)) * 30 + 1000
    mean, scale, weight, bias = fit_probe(features, labels, 4)
    logits = ((features - mean) / scale) @ weight + bias
    assert (logits.argmax(1) == labels).float().mean() > 0.99
    again = fit_probe(features, labels, 4)
    assert all(torch.equal(a, b) for a, b in zip((mean, scale, weight, bias), again, strict=True))


def test_fit_matches_scikit_learns_logistic_regression() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (300,), generator=gen)
    features = torch.randn(300, 5, generator=gen) + nn.functional.one_hot(labels, 5).float()
    mean, scale, weight, bias = fit_probe(features, labels, 3)
    standard = ((features - mean) / scale).double().numpy()
    # Ours minimises mean cross-entropy + PROBE_L2 * |W|^2; scikit-learn's
    # sum cross-entropy + |W|^2 / (2 C): the same optimum at C = 1 / (2 * n * PROBE_L2).
    reference = sklearn.LogisticRegression(C=1 / (2 * 300 * PROBE_L2), tol=1e-10, max_iter=10_000)
    reference.fit(standard, labels.numpy())
    ours = torch.from_numpy(standard) @ weight.double() + bias.double()
    theirs = torch.from_numpy(reference.decision_function(standard))
    # Softmax logits are defined up to a constant per sample: compare centred logits.
    ours, theirs = ours - ours.mean(1, keepdim=True), theirs - theirs.mean(1, keepdim=True)
    assert torch.allclose(ours, theirs, atol=2e-3)


def test_classifier_inputs_are_the_last_linears_input_in_eval_mode() -> None:
    network = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    network.train()
    x = torch.randn(5, 3)
    features, labels = classifier_inputs(network, [(x, torch.tensor([0, 1, 0, 1, 1]))])
    network.eval()
    assert torch.equal(features, network[1](network[0](x)))
    assert labels.tolist() == [0, 1, 0, 1, 1]
    network.train()
    classifier_inputs(network, [(x, torch.zeros(5, dtype=torch.long))])
    assert network.training  # its mode is restored


def test_a_network_without_a_linear_layer_is_refused() -> None:
    with pytest.raises(BnasError, match="has no nn.Linear; end the space's head with"):
        classifier_inputs(nn.Sequential(nn.Flatten()), [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))])


def test_probe_score_ignores_a_broken_shared_classifier() -> None:
    torch.manual_seed(0)
    supernet = Supernet(parse_space(TINY_CELL_SPACE))
    splits = data()
    genotype = supernet.sample(random.Random(3))
    network = supernet.network(genotype)
    # A shared classifier that says nothing: every path's own head scores at chance.
    for module in supernet.modules():
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    plain = score(supernet, genotype, splits, num_batches=2, batch_size=32)
    probed, loss = score(supernet, genotype, splits, num_batches=2, batch_size=32, probe_samples=512, with_loss=True)
    assert plain == pytest.approx(float((splits.val_y == 0).float().mean()))  # argmax of zeros: class 0
    assert probed > plain + 0.2
    assert loss > 0
    assert all(torch.equal(before[k], v) for k, v in supernet.state_dict().items())
    # The same as the probe on an extracted copy recalibrated on the same batches.
    recalibrate_bn(network, calibration_batches(splits, 2, 32, seed=0))
    assert probe_accuracy(network, splits, 512, seed=0)[0] == pytest.approx(probed, abs=1e-9)


def test_probe_needs_samples() -> None:
    with pytest.raises(BnasError, match="at least one training sample"):
        probe_accuracy(nn.Linear(2, 2), data(), 0)
