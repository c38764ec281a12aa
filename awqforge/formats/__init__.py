"""Checkpoint formats the ecosystem loads (AWQ gemm, compressed-tensors), the model card and the manifest."""

from awqforge.formats.card import ModelCardInfo, render_card
from awqforge.formats.writer import DEFAULT_SHARD_SIZE, FORMATS, ArtifactExists, ArtifactWriter, parse_size
from awqforge.manifest import build_manifest, verify_manifest, write_manifest

__all__ = [
    "ArtifactWriter",
    "ArtifactExists",
    "ModelCardInfo",
    "render_card",
    "build_manifest",
    "write_manifest",
    "verify_manifest",
    "parse_size",
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
]
