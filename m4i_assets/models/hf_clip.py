"""Hugging Face CLIPs: `transformers.CLIPModel` behind the interface the platform uses of open_clip's CLIP.

`models.clip` is the entry point (build, train, save, load any CLIP); this module holds what is specific to
a Hugging Face CLIP directory (`config.json` with model_type "clip", `model.safetensors` or
`pytorch_model.bin`, tokenizer files, `preprocessor_config.json` or, as transformers 5 saves a
CLIPProcessor, `processor_config.json`):

- `HFClip` wraps a CLIPModel with open_clip's `encode_image(x, normalize)`, `encode_text(tokens, normalize)`,
  `logit_scale` and `forward(images, tokens) -> (image features, text features, logit_scale.exp())`, so
  the one training loop and the signal code run on either kind.
- The image preprocessing is a torchvision Compose [Resize, CenterCrop, ToTensor, Normalize] built from the
  directory's image processor, the same shape as open_clip's eval transform (the AEA signal splits off its
  final Normalize); the tokenizer returns padded LongTensors of the model's context length, as open_clip's.
- `CONFIGS` are the project's own small Hugging Face configs, built offline; their vocabulary is a word-level
  tokenizer built from the training captions (`models.vocabulary`, as for the vit-gpt2 captioner).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from PIL import Image
from torch import nn
from torchvision import transforms

from m4i_assets.models.checkpoints import (
    HF_WEIGHTS_FILES,
    hf_weights_file,
    image_processor_file,
    load_weights,
    read_json_object,
)
from m4i_assets.models.vocabulary import caption_words, word_level_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer's file, or a CLIP BPE vocabulary
# eos is id 3: CLIPTextTransformer reads eos_token_id == 2 as its legacy "highest id" pooling.
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)

# The project's Hugging Face CLIP configs (CLIPConfig arguments), CPU-trainable in seconds.
CONFIGS: dict[str, dict[str, Any]] = {
    "hf-clip-tiny": {
        "projection_dim": 64,
        "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 64},
        "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    },
}  # fmt: skip


class HFClip(nn.Module):
    """A `transformers.CLIPModel` with open_clip's CLIP interface."""

    def __init__(self, hf: transformers.CLIPModel) -> None:
        super().__init__()
        self.hf = hf

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.hf.logit_scale

    @property
    def embed_dim(self) -> int:
        return int(self.hf.config.projection_dim)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.hf.get_image_features(pixel_values=image).pooler_output
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # No attention mask, as open_clip: attention is causal and pooling reads the first eos, so padding
        # after it changes nothing (and a mask would hide the eos of tokenizers that pad with it).
        features = self.hf.get_text_features(input_ids=text).pooler_output
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the temperature, as open_clip's CLIP returns them."""
        return self.encode_image(image, normalize=True), self.encode_text(text, normalize=True), self.logit_scale.exp()


class TextTokenizer:
    """A Hugging Face tokenizer with open_clip's call: texts -> LongTensor (n, context_length), padded and
    cut (the eos kept), as the model's position embeddings allow."""

    def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]


class Parts(NamedTuple):
    """What `models.clip.ClipBundle` holds of a Hugging Face CLIP."""

    model: HFClip
    preprocess: transforms.Compose
    tokenizer: TextTokenizer
    image_processor: transformers.BaseImageProcessor


def image_transform(processor: transformers.BaseImageProcessor) -> transforms.Compose:
    """The image processor's resize, centre crop, [0, 1] scaling and normalisation as a torchvision Compose
    (PIL image -> tensor) ending in Normalize, like open_clip's eval transform."""
    resample = getattr(processor, "resample", None)
    mode = transforms.InterpolationMode[Image.Resampling(Image.BICUBIC if resample is None else resample).name]
    steps: list[Any] = []
    if getattr(processor, "do_resize", True):
        size = processor.size
        if size.get("shortest_edge"):
            steps.append(transforms.Resize(size["shortest_edge"], interpolation=mode))
        elif size.get("height") and size.get("width"):
            steps.append(transforms.Resize((size["height"], size["width"]), interpolation=mode))
        else:
            raise ValueError(f"unsupported image processor size {dict(size)} (expected shortest_edge or height, width)")
    if getattr(processor, "do_center_crop", False):
        crop = processor.crop_size
        steps.append(transforms.CenterCrop((crop["height"], crop["width"])))
    rescale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
    if abs(rescale - 1 / 255) > 1e-9:  # ToTensor's scaling
        raise ValueError("unsupported image processor: only pixels rescaled by 1/255 to [0, 1] are supported")
    steps.append(transforms.ToTensor())
    if getattr(processor, "do_normalize", True):
        steps.append(transforms.Normalize(list(processor.image_mean), list(processor.image_std)))
    else:
        steps.append(transforms.Normalize([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]))
    return transforms.Compose(steps)


def build(name: str, captions: Sequence[str]) -> Parts:
    """An untrained CLIP of a config in `CONFIGS` (seed torch first), its vocabulary built from `captions`."""
    words = SPECIALS + caption_words(captions)
    spec = CONFIGS[name]
    text = {**spec["text_config"], "vocab_size": len(words), "pad_token_id": PAD, "bos_token_id": BOS,
            "eos_token_id": EOS, "attention_dropout": 0.0}  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=text,
        vision_config={**spec["vision_config"], "attention_dropout": 0.0},
        projection_dim=spec["projection_dim"],
    )
    model = HFClip(transformers.CLIPModel(config))
    tokenizer = TextTokenizer(
        word_level_tokenizer(words, pad=SPECIALS[PAD], bos=SPECIALS[BOS], eos=SPECIALS[EOS], unk=SPECIALS[UNK]),
        text["max_position_embeddings"],
    )
    size = spec["vision_config"]["image_size"]
    processor = transformers.CLIPImageProcessor(  # OpenAI CLIP's mean and std, bicubic, as open_clip's default
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return Parts(model, image_transform(processor), tokenizer, processor)


def read_config(folder: Path) -> dict[str, Any]:
    """`config.json` of a Hugging Face CLIP directory; a clear error naming it when it is not one."""
    path = folder / "config.json"
    config = read_json_object(path, f"not found: {folder} is not a Hugging Face CLIP directory")
    if config.get("model_type") != "clip":
        raise ValueError(f"{path} is not a CLIP config (model_type {config.get('model_type')!r}, expected 'clip')")
    return config


def is_clip_dir(folder: Path) -> bool:
    """Whether `folder` has a `config.json` with model_type "clip"."""
    try:
        read_config(folder)
    except (OSError, ValueError):
        return False
    return True


def load(folder: Path, weights: Path | None = None) -> Parts:
    """Load a Hugging Face CLIP directory (its `weights` file, by default the one `from_pretrained` reads);
    FileNotFoundError or ValueError naming the missing or faulty file."""
    config_path = folder / "config.json"
    read_config(folder)
    weights = weights or hf_weights_file(folder)
    if weights is None:
        raise FileNotFoundError(
            f"CLIP checkpoint incomplete: {folder / HF_WEIGHTS_FILES[0]} not found (nor {HF_WEIGHTS_FILES[1]})"
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"CLIP checkpoint incomplete: {folder / 'tokenizer_config.json'} not found")
    processor_file = image_processor_file(folder, "CLIP checkpoint")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"CLIP checkpoint incomplete: {folder / TOKENIZER_FILES[0]} not found")
    try:
        config = transformers.CLIPConfig.from_pretrained(folder)
        hf = transformers.CLIPModel(config)
    except Exception as exc:
        raise ValueError(f"{config_path} does not give a CLIPModel: {exc}") from exc
    load_weights(hf, weights, f"the CLIPModel of {config_path}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ValueError(f"the tokenizer files in {folder} (tokenizer_config.json, ...) do not load: {exc}") from exc
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {len(tokenizer)} tokens, more than the "
                         f"{config.text_config.vocab_size} of {config_path}")  # fmt: skip
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        preprocess = image_transform(processor)
    except Exception as exc:
        raise ValueError(f"{processor_file} does not give an image processor: {exc}") from exc
    return Parts(
        HFClip(hf), preprocess, TextTokenizer(tokenizer, config.text_config.max_position_embeddings), processor
    )


def save(parts: Parts, out: Path) -> Path:
    """`save_pretrained` of model, tokenizer and image processor into `out`; return the weights file.
    The safetensors metadata is {"format": "pt"} only: the same weights give the same bytes."""
    parts.model.hf.save_pretrained(out)
    parts.tokenizer.tokenizer.save_pretrained(out)
    parts.image_processor.save_pretrained(out)
    return out / HF_WEIGHTS_FILES[0]
