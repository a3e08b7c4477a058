"""The leader's decision of which nodes to declare down (pure: driven by observed polls)."""

from __future__ import annotations

from node.cluster.presence import DownDetector


def test_a_node_is_due_once_lost_for_the_window_and_only_once_per_epoch() -> None:
    detector = DownDetector(after_s=1.0)
    assert detector.observe(0.0, {2: True, 3: False}, {2: 10, 3: 20}) == []
    assert detector.observe(0.5, {2: True, 3: False}, {2: 10, 3: 20}) == []
    assert detector.observe(1.0, {2: True, 3: False}, {2: 10, 3: 20}) == [(3, 20)]
    detector.declared(3, 20)
    assert detector.observe(5.0, {2: True, 3: False}, {2: 10, 3: 20}) == []


def test_a_failed_declaration_is_due_again_at_the_next_poll() -> None:
    detector = DownDetector(after_s=1.0)
    detector.observe(0.0, {3: False}, {3: 20})
    assert detector.observe(1.0, {3: False}, {3: 20}) == [(3, 20)]
    assert detector.observe(2.0, {3: False}, {3: 20}) == [(3, 20)]  # nobody called declared()


def test_a_new_epoch_is_declarable_even_if_no_poll_saw_the_node_connected() -> None:
    # The CI failure: the leader declared a late starter down at epoch 0; the node then started, took a
    # client and was killed between two polls, and its rows of the new epoch stayed "online" for good.
    detector = DownDetector(after_s=1.0)
    detector.observe(0.0, {1: False}, {})
    assert detector.observe(1.0, {1: False}, {}) == [(1, 0)]
    detector.declared(1, 0)
    assert detector.observe(2.0, {1: False}, {1: 777}) == [(1, 777)]


def test_a_node_that_comes_back_with_the_same_epoch_is_declarable_again() -> None:
    # A partition heals (same process, same epoch), the node republishes its connections, then it is
    # partitioned again: its rows must be cleared again.
    detector = DownDetector(after_s=1.0)
    detector.observe(0.0, {3: False}, {3: 20})
    assert detector.observe(1.0, {3: False}, {3: 20}) == [(3, 20)]
    detector.declared(3, 20)
    assert detector.observe(2.0, {3: True}, {3: 20}) == []
    assert detector.observe(3.0, {3: False}, {3: 20}) == []  # the window starts again
    assert detector.observe(4.0, {3: False}, {3: 20}) == [(3, 20)]


def test_losing_leadership_forgets_everything() -> None:
    detector = DownDetector(after_s=1.0)
    detector.observe(0.0, {3: False}, {3: 20})
    detector.reset()
    assert detector.observe(1.0, {3: False}, {3: 20}) == []
