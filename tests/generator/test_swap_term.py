"""The swap term: real swapped captions as negatives, one forward pass, a gap that training widens."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import run_stage
from tokenline.params_loading import load_params
from tokenline.data.shapes_captions import swapped_caption
from tokenline.generator.model import FlowTransformer, GeneratorConfig, MaskedTransformer, TextBatch
from tokenline.generator.objectives import SwapTerm, flow_matching_swap_loss
from tokenline.generator.swap_pairs import swap_partners
from tokenline.generator.train import train_generator
from tokenline.layout import output_path
from tokenline.tokenizer.token_cache import TokenCache
from tokenline.train_config import GeneratorTrainConfig

pytestmark = pytest.mark.integration  # runs stages, trains or starts processes

ABOVE = "a large red circle above a small blue square"
LEFT = "a small green star to the left of a large cyan diamond"


def test_partners_are_rows_holding_the_swapped_caption():
    captions = [ABOVE, "a large red circle", LEFT, swapped_caption(ABOVE), ABOVE, "not a shapes caption"]
    # LEFT's swap is no caption here, so it gets no partner; the first row of a repeated caption is the one named.
    assert swap_partners(captions).tolist() == [3, -1, -1, 0, 3, -1]


def tiny_flow_model() -> FlowTransformer:
    """A small flow generator whose output depends on the caption (adaLN-zero starts it at zero)."""
    torch.manual_seed(0)
    model = FlowTransformer(GeneratorConfig(num_tokens=4, token_dim=3, width=32, depth=1, heads=2, text_dim=8,
                                            text_pooled_dim=8, text_tokens=5)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def text_rows(count: int, seed: int) -> TextBatch:
    source = torch.Generator().manual_seed(seed)
    return TextBatch(torch.randn(count, 5, 8, generator=source), torch.ones(count, 5, dtype=torch.bool),
                     torch.randn(count, 8, generator=source))


def test_one_forward_pass_gives_the_losses_of_two_separate_ones():
    model, x0 = tiny_flow_model(), torch.randn(6, 4, 3)
    text, swapped = text_rows(6, 1), text_rows(6, 2)
    has_swap = torch.tensor([True, True, False, True, True, True])
    drop = torch.tensor([False, False, False, True, False, False])
    term = SwapTerm(weight=2.0, temperature=0.05, min_t=0.0)
    torch.manual_seed(3)
    loss, flow, gap = flow_matching_swap_loss(model, x0, text, drop, swapped, has_swap, term)
    torch.manual_seed(3)  # the same t and noise, then each caption set in its own pass
    t = torch.sigmoid(torch.randn(6))
    noise = torch.randn_like(x0)
    x_t, target = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, noise - x0
    with torch.no_grad():
        own = (model(x_t, t, text, drop) - target).pow(2).mean(dim=(1, 2))
        other = (model(x_t, t, swapped, torch.zeros(6, dtype=torch.bool)) - target).pow(2).mean(dim=(1, 2))
    used = has_swap & ~drop  # row 2 has no swap, row 3 trains the null caption
    expected_gap = other[used] - own[used]
    assert flow.item() == pytest.approx(own.mean().item(), rel=1e-5)
    assert gap.item() == pytest.approx(expected_gap.mean().item(), rel=1e-4, abs=1e-7)
    expected = own.mean() + 2.0 * torch.nn.functional.softplus(-expected_gap / 0.05).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rows_noised_below_min_t_take_no_part():
    model, x0 = tiny_flow_model(), torch.randn(6, 4, 3)
    torch.manual_seed(0)
    loss, flow, gap = flow_matching_swap_loss(model, x0, text_rows(6, 1), torch.zeros(6, dtype=torch.bool),
                                              text_rows(6, 2), torch.ones(6, dtype=torch.bool), SwapTerm(1.0, min_t=0.9999))
    assert gap is None and loss.item() == flow.item()


def test_a_step_on_the_swap_term_widens_the_gap():
    model, x0 = tiny_flow_model(), torch.randn(16, 4, 3)
    text, swapped = text_rows(16, 1), text_rows(16, 2)
    args = (torch.zeros(16, dtype=torch.bool), swapped, torch.ones(16, dtype=torch.bool), SwapTerm(1.0, 0.02, 0.0))
    gaps = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        torch.manual_seed(5)  # the same t and noise both times
        loss, flow, gap = flow_matching_swap_loss(model, x0, text, *args)
        gaps.append(gap.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gaps[0] != 0 and gaps[1] > gaps[0]


@pytest.fixture()
def paired_cache(generator_project, tmp_path):
    """A copy of the tiny shapes token cache whose first 20 train captions are 10 caption/swap pairs."""
    folder = tmp_path / "tokens"
    shutil.copytree(output_path(generator_project, "shapes", "tokens"), folder)
    captions_path = folder / "train" / "captions.json"
    captions = json.loads(captions_path.read_text())
    for pair in range(10):
        caption = ABOVE if pair % 2 else LEFT
        captions[2 * pair], captions[2 * pair + 1] = caption, swapped_caption(caption)
    captions_path.write_text(json.dumps(captions))
    return TokenCache(folder)


def flow_model_for(cache: TokenCache) -> FlowTransformer:
    torch.manual_seed(0)
    meta = cache.meta
    return FlowTransformer(GeneratorConfig(
        num_tokens=meta["num_tokens"], token_dim=meta["token_dim"], width=32, depth=1, heads=2,
        text_dim=meta["text_dim"], text_pooled_dim=meta["text_pooled_dim"], text_tokens=meta["text_tokens"]))


def swap_config(**overrides) -> GeneratorTrainConfig:
    values = dict(steps=6, batch_size=16, warmup_steps=1, checkpoint_every=6, log_every=1, swap_weight=1.0,
                  swap_min_t=0.0, caption_dropout=0.0)
    return GeneratorTrainConfig(**(values | overrides))


def test_training_with_the_swap_term_logs_the_gap(paired_cache, tmp_path):
    logged = []
    summary = train_generator(flow_model_for(paired_cache), paired_cache, tmp_path / "run", swap_config(),
                              log_fn=lambda step, metrics: logged.append(metrics))
    assert summary["steps"] == 6 and len(logged) == 6
    assert all("flow_loss" in metrics and metrics["loss"] >= metrics["flow_loss"] for metrics in logged)
    # 16 of 45 rows, 20 of them paired: some batch holds a pair member (the chance that none does is ~1e-6).
    assert any("swap_gap" in metrics for metrics in logged)


def test_a_cache_without_swapped_captions_is_refused(generator_project, tmp_path):
    cache = TokenCache(output_path(generator_project, "shapes", "tokens"))
    with pytest.raises(ValueError, match="shapes:twins"):
        train_generator(flow_model_for(cache), cache, tmp_path, swap_config())


def test_a_masked_generator_is_refused(paired_cache, tmp_path):
    model = MaskedTransformer(GeneratorConfig(
        objective="masked", num_tokens=paired_cache.meta["num_tokens"], token_dim=paired_cache.meta["token_dim"],
        codebook_size=paired_cache.meta["codebook_size"], width=32, depth=1, heads=2,
        text_dim=paired_cache.meta["text_dim"], text_pooled_dim=paired_cache.meta["text_pooled_dim"],
        text_tokens=paired_cache.meta["text_tokens"]))
    with pytest.raises(ValueError, match="masked generator"):
        train_generator(model, paired_cache, tmp_path, swap_config())


def test_swap_settings_leave_existing_params_hashes_alone_until_used(project):
    default = load_params(project / "params.yaml", profile="tiny", dataset="shapes")
    assert "swap_weight" not in default.section("generator")["train"]
    swapped = load_params(project / "params.yaml", profile="tiny", overrides=["generator.train.swap_weight=3"],
                          dataset="shapes")
    assert swapped.section("generator")["train"]["swap_weight"] == 3
    assert swapped.slice_hash(["generator"], "shapes") != default.slice_hash(["generator"], "shapes")
    with pytest.raises(ValueError, match="swap_weight must be >= 0"):
        GeneratorTrainConfig(swap_weight=-1)


def test_the_generator_stage_trains_the_swap_term_on_twins(project, monkeypatch):
    uri = f"sqlite:///{project / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    sets = ("datasets.shapes.source=shapes:twins", "generator.objective=flow", "generator.train.swap_weight=1",
            "generator.train.swap_min_t=0", "generator.train.batch_size=16")
    run_stage(project, "generator", "shapes", *sets, tracking=True)
    cache = TokenCache(output_path(project, "shapes", "tokens"))
    assert (swap_partners(cache.captions) >= 0).sum() >= 4  # twins paired in the train split
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tokenline")
    generator = next(run for run in client.search_runs([experiment.experiment_id]) if run.data.tags["stage"] == "generator")
    assert generator.data.params["generator.train.swap_weight"] == "1.0"
    assert {"loss", "flow_loss", "swap_gap"} <= set(generator.data.metrics)
    gaps = client.get_metric_history(generator.info.run_id, "swap_gap")
    assert gaps and all(math.isfinite(gap.value) for gap in gaps)
