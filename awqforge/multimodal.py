"""Image-text-to-text checkpoints (Gemma 3/4, Qwen-VL, Mistral 3, LLaVA, Llama 4...): quantize the language model.

As llm-compressor does for these models, only the language model's decoder blocks are quantized; the vision
(and audio) towers and the projector that feeds their features into the text stream stay in the checkpoint's
dtype, written as they are, and are listed in the artifact's ignore list. The artifact keeps the checkpoint's
config.json (architectures, model_type and sub-configs of the multimodal model) and its processor files, so it
loads with `AutoModelForImageTextToText`.

- The model is built with `AutoModelForImageTextToText` (`auto_model_class`), on the meta device as always.
- The adapter is the text model's: the registry's entry for the text config's model_type (gemma3_text, mistral,
  llama, llama4_text...) moved onto the multimodal model's layer list (`model.language_model.layers`,
  Llama 4's `language_model.model.layers`), else the structural fallback read on those layers.
- Calibration is text through the language model: token ids go through the multimodal model's forward without
  pixel values, which is the text path of every model here (no image token is in calibration text).
- Checkpoints store the language model under other prefixes than transformers' module tree (LLaVA and Gemma 3
  `language_model.model.layers`, Qwen2.5-VL `model.layers`). The blocks are written under module names, as
  for every model: a key that no renaming touches is read alike by every transformers 5.x (5.13 mangles a
  renamed compressed key: `...q_proj.weight_packed` became `...q_projweight`) and by vLLM's name mappers;
  the towers and embeddings keep the checkpoint's names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# Processor and preprocessor files an image-text-to-text checkpoint carries besides the tokenizer's.
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "audio_preprocessor_config.json",
    "feature_extractor_config.json",
)
CALIBRATION_NOTE = "text only, through the language model (no images; the towers are not run)"


def _composite_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _has_towers(config: Any) -> bool:
    return any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))


def is_multimodal(config: Any) -> bool:
    """An image-text-to-text model: a composite config (text_config) whose model_type transformers builds as
    `AutoModelForImageTextToText`."""
    config = getattr(config, "config", config)
    return (
        getattr(config, "model_type", None) in _composite_types()
        and getattr(config, "text_config", None) is not None
    )


def auto_model_class(config: Any):
    """The transformers auto class this engine builds the model with."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM


def refusal(config: Any, missing: str, remedy: str) -> str:
    """One sentence: the model type, what is missing, how to proceed."""
    model_type = getattr(config, "model_type", None)
    text_type = getattr(getattr(config, "text_config", None), "model_type", None)
    what = f"model type {model_type!r}" + (f" (language model {text_type!r})" if text_type else "")
    return f"{what}: {missing}; {remedy}."


def short_error(exc: BaseException) -> str:
    """An exception's text without the lists of supported classes transformers appends to some errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0].split(" Model type should be one of")[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def adapter(config: Any):
    """The adapter of an image-text-to-text model: its text model's, on the multimodal model's layer list."""
    from awqforge.arch import (
        MissingPackage,
        UnsupportedArchitecture,
        _skeleton,
        registry_adapter,
        structural_adapter,
    )
    from awqforge.structure import StructureError, find_layers

    text = config.get_text_config()
    base = registry_adapter(getattr(text, "model_type", None))
    if base is None:
        try:
            found = structural_adapter(config)
        except MissingPackage:
            raise
        except UnsupportedArchitecture as exc:
            raise UnsupportedArchitecture(
                refusal(
                    config,
                    f"its language model's decoder blocks could not be mapped ({_reason(exc)})",
                    "give AWQ mappings for them with the job (JobSpec.mappings / --mappings), or quantize a "
                    "text-only checkpoint of the language model",
                )
            ) from exc
        return dataclasses.replace(found, family=f"{config.model_type} (language model, structural)")
    model = _skeleton(config)
    try:
        layers_attr = find_layers(model, text.num_hidden_layers)
    except StructureError as exc:
        raise UnsupportedArchitecture(
            refusal(config, f"no language-model layer list was found ({exc})", "give mappings with the job")
        ) from exc
    return dataclasses.replace(
        base, family=f"{config.model_type} (language model: {base.family})", layers_attr=layers_attr
    )


def _reason(exc: BaseException) -> str:
    """The innermost cause's text (the structural fallback's own finding), shortened."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return short_error(exc)


def refuse_unsupported_composite(config: Any) -> None:
    """Raise a one-sentence refusal for a config with vision/audio towers that transformers cannot build as an
    image-text-to-text model (nothing happens for any other config)."""
    from awqforge.arch import UnsupportedArchitecture

    config = getattr(config, "config", config)
    if _has_towers(config) and not is_multimodal(config):
        raise UnsupportedArchitecture(
            refusal(
                config,
                "it has vision or audio towers but transformers builds no image-text-to-text model for it",
                "quantize a text-only checkpoint of its language model, or convert it to a model type "
                "AutoModelForImageTextToText knows",
            )
        )


# -- names -----------------------------------------------------------------------------------------------


def language_model_path(model: nn.Module, layers_attr: str) -> str:
    """The module path of the language model (the decoder that holds the layers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, mod in model.named_modules():
        if mod is decoder and name and layers_attr.startswith(name + "."):
            return name
    return layers_attr.rpartition(".")[0]


def tower_paths(model: nn.Module, layers_attr: str) -> list[str]:
    """The modules beside the language model that hold weights (vision / audio towers, projectors, their
    embedders), by module path: every sibling along the path to the language model except the output head."""
    lm_path = language_model_path(model, layers_attr)
    out_emb = model.get_output_embeddings()
    towers = []
    node, prefix = model, ""
    for part in lm_path.split("."):
        for name, child in node.named_children():
            if name == part or child is out_emb or not any(True for _ in child.parameters()):
                continue
            towers.append(prefix + name)
        node, prefix = getattr(node, part), f"{prefix}{part}."
    return towers


@dataclass
class MultimodalModel:
    """What the pipeline writes about an image-text-to-text model: its towers, kept as they are, and how
    checkpoint names of tensors left in full precision read as module names."""

    model_type: str
    architectures: list[str]
    text_model_type: str
    language_model: str  # module path
    towers: list[str]  # module paths, kept in the checkpoint dtype
    module_names: dict[str, str] = field(default_factory=dict)  # checkpoint module name -> module name
    tower_tensors: set[str] = field(default_factory=set)  # checkpoint keys of the towers' tensors

    @classmethod
    def of(cls, stream) -> MultimodalModel | None:
        """From a StreamingModel; None for a text-only model."""
        config = stream.config
        if not is_multimodal(config):
            return None
        layers_attr = stream.adapter.layers_attr
        towers = tower_paths(stream.model, layers_attr)
        tower_tensors = set()
        for key in stream.reader.names():
            target = stream.module_tensor_name(key) or key
            if any(target.startswith(t + ".") for t in towers):
                tower_tensors.add(key)
        return cls(
            model_type=config.model_type,
            architectures=list(getattr(config, "architectures", None) or []),
            text_model_type=config.get_text_config().model_type,
            language_model=language_model_path(stream.model, layers_attr),
            towers=towers,
            module_names=stream.module_names(),
            tower_tensors=tower_tensors,
        )

    def is_tower_tensor(self, checkpoint_key: str) -> bool:
        return checkpoint_key in self.tower_tensors

    def is_tower(self, module_name: str) -> bool:
        return any(module_name == t or module_name.startswith(t + ".") for t in self.towers)

    def ignore_patterns(self, fmt: str) -> list[str]:
        """One entry per tower, matching it under the module tree's and the checkpoint's prefixes alike:
        a regex for compressed-tensors' `ignore` (transformers, vLLM) matching the tower itself (Fuyu's is one
        linear) or anything inside it, the attribute name for AWQ's
        `modules_to_not_convert` (a substring match in transformers and vLLM)."""
        leaves = list(dict.fromkeys(t.rpartition(".")[2] for t in self.towers))
        if fmt == "awq":
            return leaves
        return [rf"re:(.*\.)?{re.escape(leaf)}(\..*)?$" for leaf in leaves]

    def unquantized_names(self, names: list[str], fmt: str) -> list[str]:
        """The artifact's ignore list: the towers as patterns, every other module under its module name
        (what transformers' loaders match against)."""
        rest = []
        for name in names:
            module = self.module_names.get(name, name)
            if not self.is_tower(module):
                rest.append(module)
        return self.ignore_patterns(fmt) + list(dict.fromkeys(rest))

    def report(self) -> dict:
        return {
            "model_type": self.model_type,
            "architectures": self.architectures,
            "language_model": {"path": self.language_model, "model_type": self.text_model_type},
            "quantized": f"the language model's decoder blocks ({self.language_model})",
            "kept_in_checkpoint_dtype": self.towers,
            "calibration": CALIBRATION_NOTE,
            "loads_with": "AutoModelForImageTextToText",
        }

    def describe(self, card) -> None:
        """The model card's calibration line and loading snippet for this model."""
        if card.calibration:
            card.calibration += f"; {CALIBRATION_NOTE}"
        card.extra_settings["quantized part"] = f"language model (`{self.language_model}`)"
        card.extra_settings["kept as is"] = ", ".join(f"`{t}`" for t in self.towers) or "nothing"
        card.model_class = "AutoModelForImageTextToText"
        card.pipeline_tag = "image-text-to-text"
