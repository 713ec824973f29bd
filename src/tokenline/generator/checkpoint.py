"""Generator checkpoints, and the check that a generator and a tokenizer speak the same tokens."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenline.generator.model import (
    FlowTransformer,
    GeneratorConfig,
    MaskedTransformer,
    build_generator,
)
from tokenline.model_checkpoint import load_model, read_config, save_model
from tokenline.tokenizer.model import TokenizerConfig

logger = logging.getLogger(__name__)


class PairingError(ValueError):
    """A generator checkpoint used with a tokenizer whose tokens it was not trained on."""


def save_generator(model: FlowTransformer | MaskedTransformer, folder: str | Path) -> Path:
    """Write the generator's weights, then its config."""
    return save_model(model, folder)


def load_generator(folder: str | Path) -> FlowTransformer | MaskedTransformer:
    """The generator saved in `folder`, on CPU, in eval mode."""
    return load_model(folder, GeneratorConfig.from_dict, build_generator, "generator")


def pairing_problems(generator: GeneratorConfig, tokenizer) -> list[str]:
    """What makes `generator` unable to read or write the tokens of a tokenizer with config `tokenizer`."""
    problems = []
    if generator.num_tokens != tokenizer.num_tokens:
        problems.append(f"K = {generator.num_tokens} tokens vs the tokenizer's {tokenizer.num_tokens}")
    if generator.objective == "flow" and generator.token_dim != tokenizer.token_dim:
        problems.append(f"latent width {generator.token_dim} vs the tokenizer's {tokenizer.token_dim}")
    if generator.objective == "masked":
        if tokenizer.quantizer not in ("vq", "softvq"):
            problems.append(f"a masked generator needs codebook codes; the tokenizer's quantizer is {tokenizer.quantizer!r}")
        elif generator.codebook_size != tokenizer.codebook_size:
            problems.append(f"codebook of {generator.codebook_size} vs the tokenizer's {tokenizer.codebook_size}")
    if generator.binary != (tokenizer.quantizer == "binary"):
        problems.append(f"binary={generator.binary} vs the tokenizer's quantizer {tokenizer.quantizer!r}")
    return problems


def check_pairing(generator_dir: str | Path, tokenizer_dir: str | Path, tokenizer_hash: str | None = None) -> None:
    """Refuse a generator checkpoint that does not fit a tokenizer checkpoint, naming both folders.

    A matching shape with another tokenizer hash is allowed with a warning: the generator reads
    those tokens, but it learned another tokenizer's.
    """

    generator = read_config(generator_dir, GeneratorConfig.from_dict, "generator")
    tokenizer = read_config(tokenizer_dir, TokenizerConfig.from_dict, "tokenizer")
    problems = pairing_problems(generator, tokenizer)
    if problems:
        raise PairingError(
            f"generator {generator_dir} does not fit tokenizer {tokenizer_dir}: " + "; ".join(problems)
        )
    if tokenizer_hash and generator.tokenizer_hash and tokenizer_hash != generator.tokenizer_hash:
        logger.warning("generator %s was trained on tokenizer %s, not on %s (%s)", generator_dir,
                       generator.tokenizer_hash, tokenizer_dir, tokenizer_hash)
