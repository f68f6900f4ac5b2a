"""Metrics against values worked out by hand, edge cases of the binning, and streaming == one-shot."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from varlora.metrics import (
    CalibrationMetrics,
    accuracy,
    accuracy_coverage_curve,
    aurc,
    auroc,
    brier_score,
    compute_metrics,
    confidence_bins,
    expected_calibration_error,
    fpr_at_95_tpr,
    maximum_calibration_error,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
)

# Four examples, K = 3, every confidence exactly on a bin edge of 10 bins (edge -> lower bin):
#   p                 y  conf pred correct  bin (lower, upper]
#   [0.7, 0.2, 0.1]   0  0.7  0    1        6 (0.6, 0.7]
#   [0.1, 0.9, 0.0]   1  0.9  1    1        8 (0.8, 0.9]
#   [0.3, 0.6, 0.1]   0  0.6  1    0        5 (0.5, 0.6]
#   [0.2, 0.3, 0.5]   2  0.5  2    1        4 (0.4, 0.5]
# accuracy = 3/4
# ECE = (|1 - .7| + |1 - .9| + |0 - .6| + |1 - .5|) / 4 = 1.5 / 4 = 0.375   (one example per bin)
#   (were 0.5 put in the upper bin (0.5, 0.6] with 0.6: (0.3 + 0.1 + 2 * |0.5 - 0.55|) / 4 = 0.125)
# NLL = -(ln .7 + ln .9 + ln .3 + ln .5) / 4
# Brier: .09 + .04 + .01 = .14;  .01 + .01 + 0 = .02;  .49 + .36 + .01 = .86;  .04 + .09 + .25 = .38
#   mean = 1.40 / 4 = 0.35
P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.9, 0.0], [0.3, 0.6, 0.1], [0.2, 0.3, 0.5]], dtype=torch.float64)
Y = torch.tensor([0, 1, 0, 2])

# K = 2, n_bins = 2, bins (0, .5] and (.5, 1]:
#   [0.6, 0.4] y0 -> .6 correct;  [0.2, 0.8] y0 -> .8 wrong;  [1.0, 0.0] y0 -> 1.0 correct (last bin);
#   [0.5, 0.5] y1 -> tie, prediction 0 (first index), conf .5 on the edge -> bin 0, wrong
# bin 0: |0 - .5| = .5;  bin 1: |2 - (.6 + .8 + 1.0)| = .4;  ECE = (.5 + .4) / 4 = 0.225
P2 = torch.tensor([[0.6, 0.4], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
Y2 = torch.tensor([0, 0, 0, 1])


def test_hand_computed_values():
    assert accuracy(P, Y) == pytest.approx(0.75)
    assert expected_calibration_error(P, Y) == pytest.approx(0.375)
    assert negative_log_likelihood(P, Y) == pytest.approx(-(math.log(0.7 * 0.9 * 0.3 * 0.5)) / 4)
    assert brier_score(P, Y) == pytest.approx(0.35)
    assert expected_calibration_error(P2, Y2, n_bins=2) == pytest.approx(0.225)
    # MCE: the worst bin. P: one example per bin, gaps .3 .1 .6 .5 -> .6; P2: bin 0 |0 - .5| = .5,
    # bin 1 |2 - 2.4| / 3 = .133 -> .5 (the ECE weights that bin by 1/4 and reports .225)
    assert maximum_calibration_error(P, Y) == pytest.approx(0.6)
    assert maximum_calibration_error(P2, Y2, n_bins=2) == pytest.approx(0.5)
    assert accuracy(P2, Y2) == pytest.approx(0.5)


def test_compute_metrics_reports_percentages():
    m = compute_metrics(P, Y, n_bins=10)
    assert m == pytest.approx(
        {"acc": 75.0, "ece": 37.5, "nll": negative_log_likelihood(P, Y), "brier": 0.35, "n_bins": 10, "n": 4}
    )
    assert compute_metrics(P2, Y2, n_bins=2)["ece"] == pytest.approx(22.5)


def test_reliability_bins_edges_and_empty_bins():
    r = reliability_bins(P, Y, n_bins=10)
    assert r.count.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 1, 0]
    assert torch.allclose(r.edges, torch.linspace(0, 1, 11, dtype=torch.float64))
    assert r.confidence[4].item() == pytest.approx(0.5) and r.accuracy[5].item() == 0.0
    assert r.confidence[[0, 1, 2, 3, 7, 9]].isnan().all() and r.accuracy[9].isnan()
    r2 = reliability_bins(P2, Y2, n_bins=2)
    assert r2.count.tolist() == [1, 3]  # 0.5 on the edge -> bin 0, 1.0 -> last bin
    assert r2.confidence.tolist() == pytest.approx([0.5, 0.8])
    assert r2.accuracy.tolist() == pytest.approx([0, 2 / 3]) and r2.ece == pytest.approx(0.225)


def test_mce_against_a_loop_over_the_bins():
    probs, labels = _random_problem()
    confidence, prediction = probs.max(dim=-1)
    gaps = []
    for b in range(15):  # bin b holds confidences in (b/15, (b+1)/15]; 0 goes to the first bin
        inside = [i for i, c in enumerate(confidence.tolist()) if b / 15 < c <= (b + 1) / 15 or (b == 0 and c == 0)]
        if inside:
            right = sum(float(prediction[i] == labels[i]) for i in inside)
            gaps.append(abs(right - sum(confidence[i].item() for i in inside)) / len(inside))
    assert maximum_calibration_error(probs, labels, 15) == pytest.approx(max(gaps))
    assert max(gaps) >= expected_calibration_error(probs, labels, 15)  # a weighted mean of the gaps


def test_confidence_bins_pool_tasks_with_different_k():
    # P (K = 3) and P2 (K = 2) pooled through (confidence, correct), 2 bins:
    #   bin 0 (0, .5]: .5 correct (P), .5 wrong (P2) -> |1 - 1.0| = 0
    #   bin 1 (.5, 1]: .7 ok, .9 ok, .6 wrong (P); .6 ok, .8 wrong, 1.0 ok (P2) -> |4 - 4.6| = 0.6
    #   ECE = 0.6 / 8
    conf = torch.cat([P.max(-1).values, P2.max(-1).values])
    correct = torch.cat([P.argmax(-1) == Y, P2.argmax(-1) == Y2])
    pooled = confidence_bins(conf, correct, n_bins=2)
    assert pooled.ece == pytest.approx(0.6 / 8)
    assert pooled.count.tolist() == [2, 6]
    with pytest.raises(ValueError, match="one non-zero length"):
        confidence_bins(conf, correct[:3])


def test_confidence_zero_and_float32_just_above_an_edge():
    # a float32 0.3 is 0.30000001192..., above the float64 edge 0.3: bin 3 of 10, not bin 2
    p32 = torch.tensor([[0.3, 0.3, 0.2, 0.2]], dtype=torch.float32)
    assert reliability_bins(p32, torch.tensor([0]), 10).count.argmax().item() == 3
    p64 = torch.tensor([[0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    assert reliability_bins(p64, torch.tensor([0]), 10).count.argmax().item() == 2
    zeros = torch.zeros(1, 2, dtype=torch.float64)  # degenerate "probabilities": conf 0 -> bin 0
    assert reliability_bins(zeros, torch.tensor([0]), 4).count.tolist() == [1, 0, 0, 0]


def test_perfect_and_degenerate_predictions():
    onehot = torch.eye(3, dtype=torch.float64)
    m = compute_metrics(onehot, torch.arange(3))
    assert m["acc"] == 100 and m["ece"] == 0 and m["nll"] == pytest.approx(0) and m["brier"] == 0
    wrong = compute_metrics(onehot, torch.tensor([1, 2, 0]))
    assert wrong["brier"] == pytest.approx(2.0) and math.isfinite(wrong["nll"]) and wrong["ece"] == 100


def test_entropy_and_mutual_information():
    # H([.5, .5]) = ln 2, H([1, 0]) = 0 (0 log 0 = 0)
    h = predictive_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert h.tolist() == pytest.approx([math.log(2), 0.0])
    # two samples disagreeing completely: H(mean) = ln 2, mean H = 0 -> MI = ln 2; agreeing samples: MI = 0
    samples = torch.tensor([[[1.0, 0.0], [0.3, 0.7]], [[0.0, 1.0], [0.3, 0.7]]])  # (S=2, N=2, K=2)
    assert mutual_information(samples).tolist() == pytest.approx([math.log(2), 0.0])
    with pytest.raises(ValueError, match=r"\(S, N, K\)"):
        mutual_information(torch.rand(3, 2))


def test_auroc_hand_computed_and_against_pairwise_oracle():
    # positives .9, .8 beat all three negatives (3 + 3); .4 loses to .5, ties .4 (1/2), beats .1 -> 1.5
    assert auroc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)
    assert auroc([1.0], [0.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0 and auroc([2.0, 2.0], [2.0]) == 0.5
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 4, (30,), generator=g)
    diff = pos[:, None].double() - neg[None, :].double()
    oracle = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert auroc(pos, neg) == pytest.approx(oracle)
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan")], [0.1])


def _random_problem(n: int = 103, k: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, k, generator=g), -1)
    return probs, torch.randint(0, k, (n,), generator=g)


def test_streaming_equals_one_shot():
    probs, labels = _random_problem()
    m = CalibrationMetrics(n_bins=15)
    for chunk in (slice(0, 1), slice(1, 40), slice(40, 103)):
        m.update(probs[chunk], labels[chunk])
    expected = compute_metrics(probs, labels, n_bins=15)
    assert m.compute() == pytest.approx(expected) and m.compute() == pytest.approx(expected)  # no side effect
    assert expected["acc"] == pytest.approx(100 * accuracy(probs, labels))
    assert expected["ece"] == pytest.approx(100 * expected_calibration_error(probs, labels, 15))
    for a, b in zip(m.reliability(), reliability_bins(probs, labels, 15), strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
    m.reset()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    m.update(probs[:10].float(), labels[:10])
    assert m.compute() == pytest.approx(compute_metrics(probs[:10].float(), labels[:10], n_bins=15))


def test_input_validation():
    with pytest.raises(ValueError, match=r"expected probs \(N, K\)"):
        accuracy(P[0], Y)
    with pytest.raises(ValueError, match=r"expected probs \(N, K\)"):
        accuracy(P, Y[:3])
    with pytest.raises(ValueError, match="labels must lie in"):
        brier_score(P, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="n_bins"):
        CalibrationMetrics(n_bins=0)


def _distributed_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    probs, labels = _random_problem()
    m = CalibrationMetrics(n_bins=10)
    m.update(probs[rank::world], labels[rank::world])  # each process sees its shard
    queue.put((rank, m.compute()))
    dist.destroy_process_group()


def test_compute_reduces_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_distributed_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    expected = compute_metrics(*_random_problem(), n_bins=10)
    assert results[0] == pytest.approx(expected) and results[1] == pytest.approx(expected)


def test_fpr_at_95_tpr_by_hand():
    # 20 positives 1..20: ⌈0.95 · 20⌉ = 19 must stay above t, so t = 2 (the 19th largest)
    pos = torch.arange(1, 21, dtype=torch.float64)
    # negatives >= 2: 2 (tied with t: a false positive) and 3 -> 2 of 4
    assert fpr_at_95_tpr(pos, [0.0, 1.5, 2.0, 3.0]) == 0.5
    assert fpr_at_95_tpr(pos, [1.9, 0.0]) == 0.0 and fpr_at_95_tpr(pos, [25.0]) == 1.0
    # 10 positives: ⌈9.5⌉ = 10, every positive kept, t = the smallest positive 0.1
    assert fpr_at_95_tpr([k / 10 for k in range(1, 11)], [0.05, 0.1, 0.5, 2.0]) == 0.75
    # ties among the positives: t = 1, where TPR jumps from 0 to 1
    assert fpr_at_95_tpr([1.0] * 5, [0.0, 1.0, 2.0, 0.5]) == 0.5
    # perfectly separated vs. identical distributions
    assert fpr_at_95_tpr([5.0, 6.0], [1.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="scores_neg is empty"):
        fpr_at_95_tpr([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        fpr_at_95_tpr([float("nan")], [1.0])


def test_accuracy_coverage_curve_by_hand():
    # no ties: confidences .9 .8 .7 .6 with correct 1 0 1 0 -> accuracy of the top 1..4
    cov, acc, thr = accuracy_coverage_curve([0.7, 0.9, 0.6, 0.8], [1, 1, 0, 0])
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert acc.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5]) and thr.tolist() == [0.9, 0.8, 0.7, 0.6]
    # a tie is one point: .9 (right), then .5 × 3 (one right)
    cov, acc, thr = accuracy_coverage_curve([0.5, 0.9, 0.5, 0.5], torch.tensor([True, True, False, False]))
    assert cov.tolist() == [0.25, 1.0] and acc.tolist() == [1.0, 0.5] and thr.tolist() == [0.9, 0.5]


def test_aurc_by_hand_and_against_random_tie_orders():
    # no ties (sorted: right, wrong, right, wrong): risks 0, 1/2, 1/3, 1/2 -> mean 1/3
    assert aurc([0.7, 0.9, 0.6, 0.8], [1, 1, 0, 0]) == pytest.approx(1 / 3)
    # ties: .9 right, then .5 × 3 with one right: expected errors 0, 2/3, 4/3, 2
    #   risks 0, 1/3, 4/9, 1/2 -> (0 + 12/36 + 16/36 + 18/36) / 4 = 46/144
    conf, ok = [0.9, 0.5, 0.5, 0.5], [1, 1, 0, 0]
    assert aurc(conf, ok) == pytest.approx(46 / 144)
    # brute force: the mean AURC over every order of the tied examples
    tied = [1, 0, 0]
    brute = [sum(sum(1 - c for c in ([1, *order])[:k]) / k for k in range(1, 5)) / 4
             for order in itertools.permutations(tied)]
    assert aurc(conf, ok) == pytest.approx(sum(brute) / len(brute))
    # constant confidence: the error rate; a perfect ranking: (1/N) Σ_k max(0, k - n_right) / k
    assert aurc([0.3] * 5, [1, 0, 1, 1, 0]) == pytest.approx(0.4)
    assert aurc([5, 4, 3, 2, 1], [1, 1, 1, 0, 0]) == pytest.approx((1 / 4 + 2 / 5) / 5)
    assert aurc([1, 2, 3], [1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="one length"):
        aurc([1.0, 2.0], [1])


def test_ood_signals_detect_a_shifted_set():
    """Higher = in-distribution: max probability and −entropy separate confident ID from flat OOD predictions."""
    generator = torch.Generator().manual_seed(0)
    in_dist = torch.softmax(3 * torch.randn(200, 4, generator=generator, dtype=torch.float64), -1)
    ood = torch.softmax(0.3 * torch.randn(200, 4, generator=generator, dtype=torch.float64), -1)
    for score in (lambda p: p.max(-1).values, lambda p: -predictive_entropy(p)):
        assert auroc(score(in_dist), score(ood)) > 0.9
        assert fpr_at_95_tpr(score(in_dist), score(ood)) < 0.5
        assert auroc(score(ood), score(in_dist)) == pytest.approx(1 - auroc(score(in_dist), score(ood)))
