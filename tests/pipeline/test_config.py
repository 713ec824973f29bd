"""Params: profiles, overrides, and errors that name the bad key."""

from __future__ import annotations

import pytest

from tokenline.config import ConfigError
from tokenline.params_loading import load_params
from tokenline.runner import check_params


def test_profiles_layer_over_defaults(project):
    tiny = load_params(project / "params.yaml", profile="tiny")
    cpu = load_params(project / "params.yaml", profile="cpu")
    assert tiny.data.resolution == 32 and tiny.datasets["shapes"].size == 48
    assert cpu.data.resolution == 64 and cpu.datasets["shapes"].size == 2000
    assert tiny.active_datasets == cpu.active_datasets == ["openmoji", "shapes"]


def test_set_overrides_are_typed(project):
    params = load_params(project / "params.yaml", profile="tiny", overrides=["data.limit=7", "validate.max_aspect=2.5", "tracking.enabled=false"])
    assert params.data.limit == 7 and params.validate_.max_aspect == 2.5 and params.tracking.enabled is False


@pytest.mark.parametrize(
    "override,named",
    [
        ("data.resolutoin=64", "data.resolutoin"),
        ("data.resolution=big", "data.resolution"),
        ("captions.captioner=gpt", "captions.captioner"),
        ("datasets.openmoji.source=ftp:x", "datasets.openmoji.source"),
        ("shards.val_fraction=1.5", "shards.val_fraction"),
        ("tokenizer.quantizer=fsq", "tokenizer.quantizer"),
        ("tokenizer.num_tokens=24", "tokenizer.num_tokens"),
        ("tokenizer.train.lr=fast", "tokenizer.train.lr"),
        ("tokenizer.train.bogus=1", "tokenizer.train.bogus"),
        ("tokenizer.train.loss.l1=-1", "tokenizer.train.loss"),
        ("tokenizer.model.image_size=32", "data.resolution"),
        ("tokenizer.model.heads=5", "tokenizer"),
        ("recon_eval.min_code_usage=2", "recon_eval.min_code_usage"),
        ("generator.model.num_tokens=8", "generator.model.num_tokens"),
        ("generator.model.text_refiner=-1", "text_refiner"),
        # Ranges: accepted before, failing only after upstream stages ran (or never).
        ("tokenizer.train.lr=-1", "tokenizer.train.lr"),
        ("tokenizer.train.lr=nan", "tokenizer.train.lr"),
        ("tokenizer.train.weight_decay=-1", "tokenizer.train.weight_decay"),
        ("tokenizer.train.steps=true", "tokenizer.train.steps"),
        ("tokenizer.train.steps=1e20", "tokenizer.train.steps"),
        ("generator.train.lr=inf", "generator.train.lr"),
        ("generator.train.warmup_steps=-3", "generator.train.warmup_steps"),
        ("probe.train.lr=0", "probe.train.lr"),
        ("gen_eval.steps_sweep=[0]", "gen_eval.steps_sweep"),
        ("gen_eval.guidance_sweep=[-1.0]", "gen_eval.guidance_sweep"),
    ],
)
def test_bad_values_fail_naming_the_key(project, override, named):
    with pytest.raises(ConfigError) as error:
        # As the CLI and the runner do: keys by config, then what the areas know (sizes that fit).
        check_params(load_params(project / "params.yaml", profile="tiny", overrides=[override]))
    assert named in str(error.value)


def test_unknown_profile_and_dataset(project):
    with pytest.raises(ConfigError, match="profile 'huge'"):
        load_params(project / "params.yaml", profile="huge")
    with pytest.raises(ConfigError, match="dataset 'nope' is not defined"):
        load_params(project / "params.yaml", profile="tiny", dataset="nope")


@pytest.mark.parametrize("name", ["/tmp/x", "../up", "a.b", "with space"])
def test_dataset_names_are_names(project, name):
    """A dataset name becomes folders under data/ and models/: a path is refused before any work."""
    with pytest.raises(ConfigError, match="dataset name"):
        load_params(project / "params.yaml", profile="tiny", dataset=name)
    if "." not in name:  # a dotted name cannot be spelled as a --set key at all
        with pytest.raises(ConfigError, match="dataset name"):
            load_params(project / "params.yaml", profile="tiny", overrides=[f"datasets.{name}.source=shapes"])


def test_dataset_created_from_set_keys(project, tmp_path):
    params = load_params(project / "params.yaml", profile="tiny", overrides=[f"datasets.mine.source=imagefolder:{tmp_path}"], dataset="mine")
    assert params.active_datasets == ["mine"]
    assert params.dataset("mine").source == f"imagefolder:{tmp_path}"


def test_model_captioner_needs_a_model(project):
    with pytest.raises(ConfigError, match="captions"):
        load_params(project / "params.yaml", profile="tiny", overrides=["captions.captioner=model"])


def test_set_parses_lists_and_keeps_colon_values_as_strings(project):
    params = load_params(
        project / "params.yaml",
        profile="tiny",
        overrides=["active_datasets=[shapes]", "captions.template=time: {key}", "datasets.shapes.license=CC0: public", "captions.max_new_tokens=12"],
    )
    assert params.captions.max_new_tokens == 12
    assert params.active_datasets == ["shapes"]
    assert params.captions.template == "time: {key}"
    assert params.datasets["shapes"].license == "CC0: public"
    braces = load_params(project / "params.yaml", profile="tiny", overrides=["captions.template={caption}"])
    assert braces.captions.template == "{caption}"


def test_params_quantizer_names_are_the_registered_quantizers():
    from tokenline.config import QUANTIZER_NAMES
    from tokenline.tokenizer.quantizers import QUANTIZERS

    assert set(QUANTIZER_NAMES) == set(QUANTIZERS)


def test_tokenizer_config_follows_size_and_params(project):
    from tokenline.tokenizer.spec import tokenizer_config

    params = load_params(project / "params.yaml", profile="tiny", overrides=["tokenizer.quantizer=binary", "tokenizer.model.width=96"])
    config = tokenizer_config(params, text_dim=384)
    assert (config.width, config.depth, config.heads) == (96, 2, 2)  # size T, width overridden
    assert config.image_size == params.data.resolution == 32 and config.quantizer == "binary"
    assert config.text_dim == 0  # text_conditioning is off, whatever the encoder's width
    conditioned = load_params(project / "params.yaml", profile="tiny", overrides=["tokenizer.text_conditioning=true"])
    assert tokenizer_config(conditioned, text_dim=384).text_dim == 384


def test_a_quiet_default_leaves_the_stage_slice_as_it_was(project):
    # Params added later (tokenizer.train.freeze_encoder) must not make trained lineages stale at
    # their default, yet must make them stale when set.
    plain = load_params(project / "params.yaml", profile="tiny")
    default = load_params(project / "params.yaml", profile="tiny", overrides=["tokenizer.train.freeze_encoder=false"])
    frozen = load_params(project / "params.yaml", profile="tiny", overrides=["tokenizer.train.freeze_encoder=true"])
    assert "freeze_encoder" not in plain.section("tokenizer")["train"]
    assert plain.slice_hash(["tokenizer"], "shapes") == default.slice_hash(["tokenizer"], "shapes")
    assert frozen.section("tokenizer")["train"]["freeze_encoder"] is True
    assert frozen.slice_hash(["tokenizer"], "shapes") != plain.slice_hash(["tokenizer"], "shapes")
