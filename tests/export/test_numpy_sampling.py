"""The exported pipeline's numpy sampler loops agree with tokenline's torch samplers and do not depend on batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenline.export import numpy_sampling
from tokenline.generator.masked_decoding import masked_counts as torch_masked_counts
from tokenline.generator.samplers import build_sampler


@pytest.mark.parametrize("length,steps", [(16, 4), (32, 25), (32, 1), (7, 7), (64, 8)])
def test_masked_counts_match_the_torch_schedule(length, steps):
    assert numpy_sampling.masked_counts(length, steps) == torch_masked_counts(length, steps)


def _velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A smooth, time-dependent field: exact integrators disagree on it, so the comparison can fail."""
    return np.sin(3 * x) * (1 + t[:, None, None]) - 0.5 * x


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_loop_matches_the_torch_sampler(sampler):
    noise = numpy_sampling.initial_noise(numpy_sampling.image_streams(0, 0, 3), 5, 4)
    ours = numpy_sampling.sample_flow(_velocity, noise, 6, sampler)
    theirs = build_sampler(sampler).sample(
        lambda x, t: torch.from_numpy(_velocity(x.numpy(), t.numpy())), torch.from_numpy(noise), 6).x
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_multistep_consistency_sampling_re_noises_from_each_images_stream():
    """A student's sampler: one step is Euler's; two steps re-noise with the image's own stream, batch-independent."""
    noise = numpy_sampling.initial_noise(numpy_sampling.image_streams(0, 0, 3), 5, 4)
    one = numpy_sampling.sample_flow(_velocity, noise, 1, "consistency")
    np.testing.assert_allclose(one, numpy_sampling.sample_flow(_velocity, noise, 1, "euler"), atol=1e-6)
    streams = numpy_sampling.image_streams(0, 0, 3)
    whole = numpy_sampling.sample_flow(_velocity, numpy_sampling.initial_noise(streams, 5, 4), 2, "consistency", streams)
    tail_streams = numpy_sampling.image_streams(0, 2, 1)
    tail = numpy_sampling.sample_flow(_velocity, numpy_sampling.initial_noise(tail_streams, 5, 4), 2, "consistency",
                                      tail_streams)
    np.testing.assert_allclose(whole[2:], tail, atol=1e-6)
    assert not np.allclose(whole, one)


def test_an_images_noise_does_not_depend_on_its_batch():
    whole = numpy_sampling.initial_noise(numpy_sampling.image_streams(7, 0, 5), 4, 3)
    tail = numpy_sampling.initial_noise(numpy_sampling.image_streams(7, 3, 2), 4, 3)
    np.testing.assert_array_equal(whole[3:], tail)
    assert not np.array_equal(whole[0], whole[1])
    other_seed = numpy_sampling.initial_noise(numpy_sampling.image_streams(8, 0, 1), 4, 3)
    assert not np.array_equal(whole[0], other_seed[0])


def _logits(codes: np.ndarray) -> np.ndarray:
    """Logits that depend on the codes revealed so far, so decoding order matters."""
    vocabulary = 11
    revealed = (codes < vocabulary).sum(axis=1, keepdims=True)
    base = np.arange(vocabulary)[None, None, :] * 0.3
    return np.broadcast_to(base + np.cos(np.arange(codes.shape[1]))[None, :, None] * revealed[..., None],
                           (*codes.shape, vocabulary)).astype(np.float32)


def test_masked_decoding_reveals_every_code_and_is_batch_independent():
    codes = numpy_sampling.decode_masked(_logits, numpy_sampling.image_streams(1, 0, 4), 9, 11, steps=4)
    assert codes.shape == (4, 9) and codes.dtype == np.int64
    assert ((codes >= 0) & (codes < 11)).all()  # nothing left masked
    alone = numpy_sampling.decode_masked(_logits, numpy_sampling.image_streams(1, 2, 1), 9, 11, steps=4)
    np.testing.assert_array_equal(codes[2:3], alone)


def test_masked_decoding_follows_the_logits():
    def peaked(codes: np.ndarray) -> np.ndarray:
        logits = np.zeros((*codes.shape, 5), dtype=np.float32)
        logits[..., 3] = 50.0
        return logits

    codes = numpy_sampling.decode_masked(peaked, numpy_sampling.image_streams(0, 0, 2), 6, 5, steps=3)
    assert (codes == 3).all()


def test_bad_steps_and_samplers_are_refused():
    with pytest.raises(ValueError, match="steps"):
        numpy_sampling.time_grid(0)
    with pytest.raises(ValueError, match="euler, heun, consistency"):
        numpy_sampling.sample_flow(_velocity, np.zeros((1, 2, 2), np.float32), 2, "time_shift")
    with pytest.raises(ValueError, match="temperature"):
        numpy_sampling.decode_masked(_logits, numpy_sampling.image_streams(0, 0, 1), 3, 11, 2, temperature=0)
