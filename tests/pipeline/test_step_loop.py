"""The step bookkeeping both trainers share: checkpoint cadence, the final save, counts and the NaN stop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tokenline.training import TRAIN_CONFIG, RunProgress, StepLoop


def run_loop(tmp_path, steps: int, checkpoint_every: int, start: RunProgress | None = None):
    """Drive a StepLoop for `steps` total steps; the fake checkpoint records each save and marks the folder complete."""
    saved: list[tuple[int, int, float]] = []

    def checkpoint(progress: RunProgress) -> None:
        saved.append((progress.step, progress.samples_seen, progress.loss))
        (tmp_path / TRAIN_CONFIG).write_text("{}")

    config = SimpleNamespace(steps=steps, checkpoint_every=checkpoint_every, log_every=1)
    loop = StepLoop("test", config, start or RunProgress(), 8, checkpoint, tmp_path, show_bar=False)
    while loop.running():
        loop.advance(loss=float(loop.step), samples=8)
        loop.checkpoint_if_due()
    rate = loop.finish()
    return loop, saved, rate


def test_checkpoints_at_the_cadence_and_once_at_the_end(tmp_path):
    loop, saved, rate = run_loop(tmp_path, steps=5, checkpoint_every=2)
    assert [s[0] for s in saved] == [2, 4, 5]
    assert saved[-1] == (5, 40, 4.0)  # samples add up; the loss is the last step's
    assert loop.step == 5 and rate > 0


def test_no_second_save_when_the_last_step_was_just_saved(tmp_path):
    _, saved, _ = run_loop(tmp_path, steps=4, checkpoint_every=2)
    assert [s[0] for s in saved] == [2, 4]


def test_a_resumed_loop_counts_on_from_its_progress(tmp_path):
    loop, saved, _ = run_loop(tmp_path, steps=6, checkpoint_every=3, start=RunProgress(3, 24, 0.5))
    assert [s[:2] for s in saved] == [(6, 48)]
    assert loop.first_step == 3


def test_a_finished_run_saves_once_when_no_state_folder_exists(tmp_path):
    # Resuming at the final step: nothing to train, but the state folder must exist afterwards.
    _, saved, rate = run_loop(tmp_path, steps=2, checkpoint_every=10, start=RunProgress(2, 16, 0.1))
    assert [s[0] for s in saved] == [2] and rate == 0.0


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    config = SimpleNamespace(steps=3, checkpoint_every=1, log_every=1)
    loop = StepLoop("test", config, RunProgress(1, 8, 0.2), 8, lambda p: None, tmp_path, show_bar=False)
    with pytest.raises(FloatingPointError, match="at step 2"):
        loop.refuse_non_finite(torch.tensor(float("nan")))
