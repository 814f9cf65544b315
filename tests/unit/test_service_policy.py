"""The auto policy's rule and cost model (pure arithmetic on measured costs)."""

from __future__ import annotations

import pytest

from service.batcher import Candidate
from service.policy import CostModel, chooser

SHAPE = (3, 224, 224)


def costs(switch: float, merged: float, mixed: float) -> CostModel:
    c = CostModel()
    c.observe_switch(switch)
    c.observe_batch("merged", SHAPE, 10, merged * 10)
    c.observe_batch("mixed", SHAPE, 10, mixed * 10)
    return c


def cand(merged: int, mixed: int, *, weight_key: object = ("a", 1), live: object = ("b", 1)) -> Candidate:
    return Candidate(shape=SHAPE, weight_key=weight_key, live=live, merged_images=merged, mixed_images=mixed)


def test_one_task_is_always_merged():
    assert costs(1.0, 0.01, 0.001).choose(cand(3, 3)) == "merged"


def test_without_measurements_merged_is_chosen():
    assert CostModel().choose(cand(1, 16)) == "merged"


def test_long_tail_with_costly_switch_goes_mixed():
    # merged: 10 ms switch + 1 image * 2 ms = 12 ms for 1 image; mixed: 10 ms + 16 * 2.5 ms = 50 ms for 16
    assert costs(0.010, 0.002, 0.0025).choose(cand(1, 16)) == "mixed"


def test_cheap_switch_and_big_group_stays_merged():
    # merged: 0.1 ms + 8 * 2 ms = 16.1 ms for 8 (497/s); mixed: 0.1 ms + 16 * 4 ms = 64.1 ms for 16 (250/s)
    assert costs(0.0001, 0.002, 0.004).choose(cand(8, 16)) == "merged"


def test_live_weights_count_in_the_switch_cost():
    c = costs(0.010, 0.002, 0.0025)
    # another task live: merged 10 + 2 * 2 = 14 ms for 2 (143/s) vs mixed 10 + 16 * 2.5 = 50 ms for 16 (320/s)
    assert c.choose(cand(2, 16)) == "mixed"
    # this task live: merged 4 ms for 2 (500/s) without a switch
    assert c.choose(cand(2, 16, live=("a", 1))) == "merged"
    # base live: mixed needs no switch either, 40 ms for 16 (400/s) vs merged 14 ms for 2
    assert c.choose(cand(2, 16, live=None)) == "mixed"


def test_moving_average_tracks_measurements():
    c = CostModel(smoothing=0.5)
    c.observe_switch(1.0)
    c.observe_switch(3.0)
    assert c.switch_s == pytest.approx(2.0)
    c.observe_batch("mixed", SHAPE, 4, 0.4)
    assert c.per_image("mixed", SHAPE) == pytest.approx(0.1)
    assert c.per_image("merged", SHAPE) is None
    assert set(c.snapshot()) == {"switch_s", f"mixed_per_image_s@{SHAPE}/b4-7"}


def test_estimates_are_per_batch_size_class():
    c = CostModel()
    c.observe_batch("mixed", SHAPE, 4, 4 * 0.010)  # class 4-7: 10 ms an image
    c.observe_batch("mixed", SHAPE, 16, 16 * 0.002)  # class 16-31: 2 ms an image
    assert c.per_image("mixed", SHAPE, 5) == pytest.approx(0.010)
    assert c.per_image("mixed", SHAPE, 16) == pytest.approx(0.002)
    assert c.per_image("mixed", SHAPE, 64) == pytest.approx(0.002)  # nearest measured class
    assert c.per_image("mixed", SHAPE, 1) == pytest.approx(0.010)
    assert c.per_image("mixed", SHAPE, 12) == pytest.approx(0.010)  # 8-15: equidistant, the smaller class wins
    assert c.per_image("mixed", (3, 96, 96), 4) is None
    # the batch that decides uses its own class: 1 image merged (12 ms) vs 16 mixed at 2 ms, not at 10 ms
    c.observe_switch(0.010)
    c.observe_batch("merged", SHAPE, 1, 0.002)
    assert c.choose(cand(1, 16)) == "mixed"
    assert c.choose(cand(1, 4)) == "merged"  # mixed 4 at 10 ms + switch: 12.5 ms an image vs merged 12 ms


def test_a_stale_estimate_is_explored_and_replaced():
    c = CostModel(explore_every=4)
    c.observe_switch(0.001)
    c.observe_batch("merged", SHAPE, 16, 16 * 0.010)
    c.observe_batch("mixed", SHAPE, 16, 16 * 0.100)  # a bad warm-up figure: mixed looks 10x slower
    picks = [c.choose(cand(2, 16)) for _ in range(5)]
    assert picks == ["merged"] * 4 + ["mixed"]  # the 5th contested decision explores mixed
    assert c.explorations == 1
    c.observe_batch("mixed", SHAPE, 16, 16 * 0.004)  # what mixed really costs now
    assert c.per_image("mixed", SHAPE, 16) == pytest.approx(0.004)  # replaced, not averaged with 0.100
    assert c.choose(cand(2, 16)) == "mixed"
    c.observe_batch("mixed", SHAPE, 16, 16 * 0.006)  # ordinary measurements are averaged again
    assert c.per_image("mixed", SHAPE, 16) == pytest.approx(0.004 + 0.2 * 0.002)


def test_exploration_works_both_ways_and_ignores_uncontested_batches():
    c = CostModel(explore_every=3)
    c.observe_switch(0.010)
    c.observe_batch("merged", SHAPE, 1, 0.002)
    c.observe_batch("mixed", SHAPE, 16, 16 * 0.001)
    assert all(c.choose(cand(16, 16)) == "merged" for _ in range(10))  # one task only: not contested
    assert c.explorations == 0
    picks = [c.choose(cand(1, 16)) for _ in range(8)]
    assert picks == ["mixed"] * 3 + ["merged"] + ["mixed"] * 3 + ["merged"]
    assert c.explorations == 2


def test_explore_every_must_be_positive():
    with pytest.raises(ValueError, match="explore_every"):
        CostModel(explore_every=0)


@pytest.mark.parametrize(("policy", "can_mix", "mode"), [("merged", False, "merged"), ("mixed", True, "mixed")])
def test_fixed_policies(policy, can_mix, mode):
    mix, choose = chooser(policy, CostModel())
    assert mix is can_mix
    assert choose(cand(1, 16)) == mode


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        chooser("fastest", CostModel())
