"""The step objective: CE, and both distrust modes, against values computed by hand (plain Python math)."""

import math
from types import SimpleNamespace

import pytest
import torch

from memfit.config import TrainConfig
from memfit.data import collate
from memfit.data.packing import Row
from memfit.train.losses import IGNORE_INDEX, distrust_values, full_logits_loss, scored_tokens
from memfit.train.objective import label_weights, step_objective

# Two rows; row 0 packs sample 0 (positions 0-2) and sample 1 (3-4); row 1 holds sample 2 with a masked prompt.
ROWS = [
    Row(input_ids=[1, 2, 0, 2, 1], labels=[1, 2, 0, IGNORE_INDEX, 1], segments=[(0, 3, 0), (3, 5, 1)]).count_scored(),
    Row(input_ids=[2, 1, 1, 0], labels=[IGNORE_INDEX, IGNORE_INDEX, 1, 0], segments=[(0, 4, 2)]).count_scored(),
]
SAMPLES = [SimpleNamespace(auth_weight=0.9, prov_entropy=0.5),
           SimpleNamespace(auth_weight=0.1, prov_entropy=6.0),
           SimpleNamespace(auth_weight=0.5, prov_entropy=2.0)]
VOCAB = 3


def _logits() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    width = max(len(row.input_ids) for row in ROWS)
    return torch.randn(len(ROWS), width, VOCAB, generator=generator, dtype=torch.float64)


def _token_ce(logits, row: int, position: int, target: int) -> float:
    values = logits[row, position].tolist()
    return math.log(sum(math.exp(v) for v in values)) - values[target]


def _scored_by_sample(logits) -> dict[int, list[float]]:
    """CE of every scored target, by sample: position p-1 predicts label p (p >= 1, label not ignored)."""
    out: dict[int, list[float]] = {}
    for r, row in enumerate(ROWS):
        for start, end, sample in row.segments:
            for p in range(max(start, 1), end):
                if row.labels[p] != IGNORE_INDEX:
                    out.setdefault(sample, []).append(_token_ce(logits, r, p - 1, row.labels[p]))
    return out


def _padded_labels() -> torch.Tensor:
    width = max(len(row.input_ids) for row in ROWS)
    return torch.tensor([row.labels + [IGNORE_INDEX] * (width - len(row.labels)) for row in ROWS])


def _loss(config, rows=slice(None)) -> tuple[float, object]:
    objective = step_objective(ROWS, SAMPLES, config)
    logits = _logits()
    weights = label_weights(objective, collate(ROWS[rows], SAMPLES, pad_id=0))  # collated alone: own width
    weights = torch.nn.functional.pad(weights, (0, logits.shape[1] - weights.shape[1]))
    loss = full_logits_loss(logits[rows], scored_tokens(_padded_labels()[rows], weights.double()))
    return float(loss), objective


def test_ce_is_the_token_mean_over_the_step():
    by_sample = _scored_by_sample(_logits())
    tokens = [ce for values in by_sample.values() for ce in values]
    loss, objective = _loss(TrainConfig(loss="ce"))
    assert objective.scored_tokens == len(tokens) == 5
    assert loss == pytest.approx(sum(tokens) / len(tokens), rel=1e-6)
    assert objective.distrust_term is None


def _hand_distrust(alpha=2.7):
    return [alpha * (math.log(1 - s.auth_weight + 1e-8) + s.prov_entropy) ** 2 for s in SAMPLES]


def test_distrust_values_match_the_formula():
    values = distrust_values(torch.tensor([s.auth_weight for s in SAMPLES]),
                             torch.tensor([s.prov_entropy for s in SAMPLES]), 2.7)
    assert values.tolist() == pytest.approx(_hand_distrust(), rel=1e-6)


def test_distrust_weight_mode_weights_each_sample_mean_ce():
    lam = 0.6
    by_sample = _scored_by_sample(_logits())
    raw = [1 + lam * value for value in _hand_distrust()]
    weights = [w / (sum(raw) / len(raw)) for w in raw]
    per_sample_ce = [sum(by_sample[i]) / len(by_sample[i]) for i in range(3)]
    expected = sum(w * ce for w, ce in zip(weights, per_sample_ce)) / 3
    loss, objective = _loss(TrainConfig(loss="distrust", distrust_mode="weight", lambda_weight=lam))
    assert loss == pytest.approx(expected, rel=1e-6)
    assert objective.distrust_term == pytest.approx(lam * sum(_hand_distrust()) / 3, rel=1e-9)
    # The low-authority, high-entropy sample (1) really counts more than the authoritative one (0).
    assert weights[1] > 1 > weights[0]


def test_distrust_add_mode_adds_a_constant_to_the_logged_loss_only():
    lam = 0.6
    config = TrainConfig(loss="distrust", distrust_mode="add", lambda_weight=lam)
    loss, objective = _loss(config)
    ce_loss, _ = _loss(TrainConfig(loss="ce"))
    # The optimized sum is plain CE (the term is constant in the weights); the term is reported for the log.
    assert loss == pytest.approx(ce_loss, rel=1e-12)
    assert objective.distrust_term == pytest.approx(lam * sum(_hand_distrust()) / 3, rel=1e-9)


@pytest.mark.parametrize("config", [TrainConfig(loss="ce"), TrainConfig(loss="distrust")])
def test_splitting_the_step_into_micro_batches_gives_the_same_loss(config):
    whole, _ = _loss(config)
    parts = sum(_loss(config, slice(i, i + 1))[0] for i in range(len(ROWS)))
    assert parts == pytest.approx(whole, rel=1e-12)
