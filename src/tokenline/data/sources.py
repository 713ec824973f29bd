"""Build a dataset's source from its spec (`source: scheme[:argument]` plus options)."""

from __future__ import annotations

from tokenline.config import DatasetSpec
from tokenline.data.coco import CocoSource
from tokenline.data.imagefolder import ImageFolderSource
from tokenline.data.openmoji import OpenMojiSource
from tokenline.data.records import Source
from tokenline.data.shapes import ShapesSource
from tokenline.data.webdataset_source import WebDatasetSource


def build_source(spec: DatasetSpec, resolution: int) -> Source:
    """The Source object a dataset spec names."""
    scheme, _, argument = spec.source.partition(":")
    if scheme == "openmoji":
        return OpenMojiSource(resolution=resolution, seed=spec.seed)
    if scheme == "shapes":
        return ShapesSource(resolution=resolution, size=spec.size or 2000, seed=spec.seed, twins=argument == "twins")
    if scheme == "imagefolder":
        return ImageFolderSource(argument, license=spec.license)
    if scheme == "webdataset":
        return WebDatasetSource(argument, license=spec.license)
    if scheme == "coco":
        annotations, _, image_dir = argument.partition(",")
        return CocoSource(annotations, image_dir, license=spec.license)
    raise ValueError(f"unknown source scheme {scheme!r} in {spec.source!r}")
