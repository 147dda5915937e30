"""Hugging Face image-to-text captioners, whatever saved them: the transformers side of `models.captioner`'s
Hugging Face archs (its vit-gpt2, a user's directory, a shadow built from a user's config).

A captioner directory is what `save_pretrained` writes for a model that transformers loads as image-to-text
(`is_captioner_config`: a model type of AutoModelForImageTextToText, or of AutoModelForVision2Seq where that
exists, saved as that class): VisionEncoderDecoderModel, BlipForConditionalGeneration, GitForCausalLM and the
like, beside its tokenizer and image processor files (as a BlipProcessor's or GitProcessor's `save_pretrained`
writes them). A model type's other classes are not captioners (BlipModel, BLIP's contrastive dual encoder). The
model captions from the image alone; models that need a text prompt (chat models) are not captioners here.

Each model keeps its own conventions, read from its config:
- decoding starts from one token (`start_token`): an encoder-decoder's decoder start token (VisionEncoderDecoder),
  else its text decoder's bos (BLIP's `generate` puts it first; GIT's is [CLS]);
- a reference caption is teacher-forced as the model's own `labels=` loss reads the tokenizer's ids
  (`caption_tokens`): an encoder-decoder predicts every id after the start token (its decoder inputs are the
  labels shifted right); a model fed the ids themselves (BLIP, GIT) predicts every id after the first, the first
  (the tokenizer's [CLS]) replaced by the start token, as BLIP's `generate` does (a no-op for GIT), or the start
  token put before the ids when the tokenizer writes no leading special token;
- the logits of the caption's tokens are the model's last ones (GIT's follow its image tokens).
The NLL of a caption, the mean of -log p over its predicted tokens, is then the model's own loss on that caption
alone (BLIP's with its default `label_smoothing` 0).

`untrained_twin` is a randomly initialised model of a directory's config with the directory's tokenizer and
image processor: a shadow captioner of the target's own architecture (M^4I's unrestricted scenario).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

from m4i_assets.models.checkpoints import hf_weights_file, read_json_object
from m4i_assets.models.hf_files import tokenizer_and_image_processor

IGNORE = -100
"""What follows a caption's end in `caption_tokens` (the ignored label of Hugging Face losses)."""
SUPPORTED = (
    'this platform\'s captioner folders (config.json with family "captioner") or a Hugging Face image-to-text '
    "directory: a config.json whose model_type AutoModelForImageTextToText loads (vision-encoder-decoder, blip, git, "
    "...) and whose architectures are that class, its weights, tokenizer and image processor files"
)
"""The captioner directories `models.captioner.load_captioner` loads, for error messages."""
_AUTO_CLASSES = (
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModelForVision2Seq", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"),
)


@functools.cache
def image_text_classes(model_type: str) -> tuple[str, ...]:
    """The class names transformers' image-to-text Auto classes build for `model_type` (none: not a captioner)."""
    from transformers.models.auto import modeling_auto

    found = [getattr(modeling_auto, names, {}).get(model_type) for _, names in _AUTO_CLASSES]
    return tuple(dict.fromkeys(n for name in found if name for n in ((name,) if isinstance(name, str) else name)))


def is_captioner_config(config: dict) -> bool:
    """Whether a parsed `config.json` is an image-to-text model's: its model_type has image-to-text classes and its
    `architectures`, when saved, name one of them."""
    classes = image_text_classes(config["model_type"]) if isinstance(config.get("model_type"), str) else ()
    architectures = config.get("architectures")
    return bool(classes) and (not isinstance(architectures, list) or any(a in classes for a in architectures))


def auto_model_class(model_type: str) -> type:
    """The Auto class that loads an image-to-text model of `model_type`."""
    from transformers.models.auto import modeling_auto

    for auto, names in _AUTO_CLASSES:
        if model_type in getattr(modeling_auto, names, {}):
            return getattr(transformers, auto)
    raise ValueError(f"model_type {model_type!r} is not an image-to-text model; supported: {SUPPORTED}")


def check_captioner_config(config_path: Path, config: dict) -> str:
    """The model_type of a parsed `config.json` that `is_captioner_config`; a ValueError naming the file, its
    model_type and architectures, and the kinds supported otherwise."""
    if not is_captioner_config(config):
        architectures = config.get("architectures")
        found = repr(config.get("model_type")) + (f" (architectures {architectures})" if architectures else "")
        raise ValueError(f"{config_path}: model_type {found} is not a captioner; supported: {SUPPORTED}")
    return config["model_type"]


def start_token(hf: transformers.PreTrainedModel) -> int:
    """The token decoding starts from: an encoder-decoder's decoder start token, else the text decoder's bos."""
    config = hf.config
    if config.is_encoder_decoder:
        token = hf.generation_config.decoder_start_token_id
        token = config.decoder_start_token_id if token is None else token
    else:
        token = config.get_text_config(decoder=True).bos_token_id
    if not isinstance(token, int):
        raise ValueError(f"the {config.model_type} model's config names no start token (decoder start or bos)")
    return token


def pad_token(hf: transformers.PreTrainedModel) -> int:
    """The id fed after a caption's end (masked out): the text decoder's pad token, else 0."""
    pad = hf.config.get_text_config(decoder=True).pad_token_id
    return pad if isinstance(pad, int) else 0


def caption_tokens(
    hf: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, captions: list[str], max_len: int
) -> torch.Tensor:
    """Teacher-forced ids of captions (module docstring), one row each: the start token, the predicted ids, then
    `IGNORE` up to the longest row. The tokenizer cuts a caption at `max_len + 2` ids, its special tokens kept."""
    encoded = tokenizer(captions, truncation=True, max_length=max_len + 2, return_special_tokens_mask=True)
    start, rows = start_token(hf), []
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        fed_as_is = not hf.config.is_encoder_decoder and special[:1] == [1]  # its first id is the start position
        rows.append([start, *(ids[1:] if fed_as_is else ids)])
    width = max(map(len, rows))
    return torch.tensor([row + [IGNORE] * (width - len(row)) for row in rows], dtype=torch.long)


def teacher_forced_logits(
    hf: transformers.PreTrainedModel, pixels: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits for tokens[:, 1:] given the image and tokens[:, :-1] (tokens[:, 0] the start token; `mask` False
    after each caption's end, where the model reads its pad token)."""
    ids = tokens.masked_fill(~mask, pad_token(hf))
    if hf.config.is_encoder_decoder:
        return hf(
            pixel_values=pixels, decoder_input_ids=ids[:, :-1], decoder_attention_mask=mask[:, :-1], use_cache=False
        ).logits
    logits = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    return logits[:, -ids.shape[1] : -1]


def image_size(config: transformers.PretrainedConfig) -> int | None:
    """The side of the images the model's vision tower takes (BLIP's and GIT's vision_config, an encoder's)."""
    vision = getattr(config, "vision_config", None) or getattr(config, "encoder", None)
    size = getattr(vision, "image_size", None)
    return size if isinstance(size, int) else None


def text_positions(config: transformers.PretrainedConfig) -> int | None:
    """How many text positions the text decoder embeds (the start token included), when its config says."""
    positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def load_model(folder: Path, model_type: str) -> transformers.PreTrainedModel:
    """A directory's image-to-text model (weights `model.safetensors` or `pytorch_model.bin`); FileNotFoundError
    or ValueError naming the file otherwise."""
    weights = hf_weights_file(folder) or folder / "model.safetensors"
    try:
        return auto_model_class(model_type).from_pretrained(folder)
    except OSError as exc:
        if not weights.is_file():
            raise FileNotFoundError(f"captioner checkpoint incomplete: {weights} not found ({exc})") from exc
        raise ValueError(f"{weights} is not a readable checkpoint: {exc}") from exc
    except Exception as exc:  # safetensors header errors, shape mismatches
        first_line = str(exc).splitlines()[0]
        raise ValueError(f"{weights} does not load into the model of {folder / 'config.json'}: {first_line}") from exc


def untrained_twin(
    folder: Path, seed: int
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, transformers.BaseImageProcessor]:
    """A model of the directory's config initialised from `seed` (its own random init), with the directory's
    generation config, tokenizer and image processor; the directory's weights are never read."""
    config_path = folder / "config.json"
    auto = auto_model_class(check_captioner_config(config_path, read_json_object(config_path, "not found")))
    config = transformers.AutoConfig.from_pretrained(folder)
    tokenizer, processor = tokenizer_and_image_processor(folder, "captioner checkpoint")
    torch.manual_seed(seed)
    hf = auto.from_config(config)
    if (folder / "generation_config.json").is_file():
        hf.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return hf, tokenizer, processor
