"""Hugging Face dual encoders: any transformers model with image and text embeddings and a pairing score
(`CLIPModel`, `SiglipModel`, `Siglip2Model`, ...) behind the interface the platform uses of open_clip's CLIP.

`models.clip` is the entry point (build, train, save, load any CLIP); this module holds what is specific to
a Hugging Face directory: `config.json` whose `model_type` transformers maps (AutoModel) to a contrastive dual
encoder (`dual_encoder_class`: a class with `get_image_features`, `get_text_features` and a contrastive loss
in its forward, `return_loss`; any other model_type is refused, naming the file, the model_type and the
supported ones), `model.safetensors` or `pytorch_model.bin`, tokenizer files (`tokenizer.json`, a CLIP BPE
`vocab.json`, a sentencepiece model as SigLIP's `spiece.model` or Gemma's `tokenizer.model`, ...) and the
image processor (`preprocessor_config.json` or, as transformers 5 saves a Processor, `processor_config.json`),
loaded as `AutoProcessor` gives them (else `AutoTokenizer` and `AutoImageProcessor`).

- `HFClip` wraps the model with open_clip's `encode_image(x, normalize)`, `encode_text(tokens, normalize)`,
  `logit_scale` (and `logit_bias` for a sigmoid model: SigLIP, SigLIP 2) and `forward(images, tokens) ->
  (image features, text features, logit_scale.exp()[, logit_bias])`, as open_clip's CLIP and SigLIP return
  them, so the one training loop and the signal code run on either kind.
- The image preprocessing is a torchvision Compose built from the directory's image processor, the same shape
  as open_clip's eval transform (the AEA signal splits off its final Normalize): CLIP's [Resize shortest edge,
  CenterCrop, ToTensor, Normalize]; SigLIP's [Resize to height x width, ToTensor, Normalize] (no crop); SigLIP 2
  (NaFlex) resizes to the square of at most `max_num_patches` patches and `HFClip` cuts the batch into the
  patch sequence, mask and spatial shapes its vision tower reads (exactly the processor's for square images;
  other aspect ratios are squashed to the square instead of keeping their own patch grid).
- The tokenizer returns LongTensors (n, context length) as open_clip's, padded to `max_length` (the text
  tower's `max_position_embeddings`: 64 for SigLIP, which reads the last position) and cut. The text tower
  sees what the model's own tokenizer gives it: CLIP-type towers (causal attention, pooled at the eos) take
  the ids alone, as open_clip does; other towers also take the tokenizer's attention mask, carried in the
  same tensor (`TextTokenizer`).
- `CONFIGS` are the project's own small Hugging Face configs, built offline; their vocabulary is a word-level
  tokenizer built from the training captions (`models.vocabulary`, as for the vit-gpt2 captioner).
"""

from __future__ import annotations

import functools
import inspect
import math
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
from m4i_assets.models.hf_files import tokenizer_and_image_processor
from m4i_assets.models.vocabulary import caption_words, word_level_tokenizer

# A fast tokenizer's file, a CLIP BPE vocabulary, a sentencepiece model (SigLIP's, Gemma's, XLM-R's), a WordPiece one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
)
# Model types whose text tower is CLIP's: causal attention pooled at the eos, so padding after the eos changes
# nothing and the tower takes the ids alone (no attention mask), as open_clip's CLIP does.
CAUSAL_TEXT = ("clip", "metaclip_2", "owlvit", "owlv2", "groupvit", "clipseg", "xclip")
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
    """A Hugging Face dual encoder (`CLIPModel`, `SiglipModel`, ...) with open_clip's CLIP interface.
    `text_mask`: the text tokens carry the tokenizer's attention mask (`TextTokenizer`); `patches`: (patch size,
    max patches) of a NaFlex vision tower (SigLIP 2), which reads patch sequences instead of images."""

    def __init__(
        self, hf: transformers.PreTrainedModel, text_mask: bool = False, patches: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.hf = hf
        self.text_mask = text_mask
        self.patches = patches

    @property
    def logit_scale(self) -> torch.Tensor:
        """The log of the multiplier of the cosine similarities (ALIGN's `temperature` t gives log(1 / t))."""
        if isinstance(getattr(self.hf, "logit_scale", None), torch.Tensor):
            return self.hf.logit_scale
        temperature = getattr(self.hf, "temperature", None)
        if isinstance(temperature, torch.Tensor):
            return -torch.log(temperature)
        raise ValueError(f"{type(self.hf).__name__} has neither logit_scale nor temperature")

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """The learned bias of a sigmoid pairing score (SigLIP, SigLIP 2); None for a softmax one (CLIP)."""
        bias = getattr(self.hf, "logit_bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def embed_dim(self) -> int:
        config = self.hf.config
        for name in ("projection_dim", "image_text_hidden_size"):  # CLIP-like; BLIP
            if isinstance(getattr(config, name, None), int):
                return int(getattr(config, name))
        text = getattr(config, "text_config", None)  # SigLIP: the text head's width, the vision tower's
        width = getattr(text, "projection_size", None) or getattr(config.vision_config, "hidden_size", None)
        return int(width)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        inputs = {"pixel_values": image} if self.patches is None else patch_inputs(image, *self.patches)
        features = _pooled(self.hf.get_image_features(**inputs))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # CLIP-type towers get no attention mask, as open_clip: attention is causal and pooling reads the first
        # eos, so padding after it changes nothing (and a mask would hide the eos of tokenizers that pad with
        # it). Other towers get the tokenizer's mask, carried in the tokens (`TextTokenizer`).
        if self.text_mask:
            mask = text >= 0
            features = _pooled(
                self.hf.get_text_features(input_ids=torch.where(mask, text, -1 - text), attention_mask=mask.long())
            )
        else:
            features = _pooled(self.hf.get_text_features(input_ids=text))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised image and text features and the temperature, as open_clip's CLIP returns them, and the
        bias of a sigmoid model, as open_clip's SigLIP does."""
        out = (self.encode_image(image, normalize=True), self.encode_text(text, normalize=True), self.logit_scale.exp())
        return out if self.logit_bias is None else (*out, self.logit_bias)


def _pooled(output: Any) -> torch.Tensor:
    """The embeddings a `get_*_features` returns: a tensor (transformers 4), or the pooled output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def patch_inputs(images: torch.Tensor, patch_size: int, max_patches: int) -> dict[str, torch.Tensor]:
    """A NaFlex vision tower's inputs for a batch of normalised images (n, 3, H, W), as Siglip2ImageProcessor
    makes them: the patches in row-major order, each (patch row, patch column, channel) flattened, padded to
    `max_patches`, with their mask and the (rows, columns) grid."""
    n, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(n, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(n, rows * cols, patch_size * patch_size * channels)
    mask = torch.zeros(n, max_patches, dtype=torch.int32, device=images.device)
    mask[:, : rows * cols] = 1
    padded = nn.functional.pad(patches, (0, 0, 0, max_patches - rows * cols))
    shapes = torch.tensor([[rows, cols]] * n, dtype=torch.long, device=images.device)
    return {"pixel_values": padded, "pixel_attention_mask": mask, "spatial_shapes": shapes}


class TextTokenizer:
    """A Hugging Face tokenizer with open_clip's call: texts -> LongTensor (n, context_length), padded to the
    context length (`padding="max_length"`, as SigLIP was trained) and cut (the eos kept), as the model's
    position embeddings allow. With `mask`, the positions the tokenizer's attention mask leaves out (its
    padding) hold `-1 - id`: the tensor stays one LongTensor for batching, and `HFClip.encode_text` splits it
    back into ids and mask."""

    def __init__(
        self, tokenizer: transformers.PreTrainedTokenizerBase, context_length: int, mask: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.mask = mask

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        ids = encoded["input_ids"]
        if self.mask and "attention_mask" in encoded:
            ids = torch.where(encoded["attention_mask"].bool(), ids, -1 - ids)
        return ids


class Parts(NamedTuple):
    """What `models.clip.ClipBundle` holds of a Hugging Face dual encoder."""

    model: HFClip
    preprocess: transforms.Compose
    tokenizer: TextTokenizer
    image_processor: transformers.BaseImageProcessor


def image_transform(processor: transformers.BaseImageProcessor) -> transforms.Compose:
    """The image processor's resize, centre crop, [0, 1] scaling and normalisation as a torchvision Compose
    (PIL image -> tensor) ending in Normalize, like open_clip's eval transform: CLIP's shortest-edge resize and
    centre crop, SigLIP's resize to height x width (no crop), SigLIP 2's (NaFlex) resize to the largest square
    of at most `max_num_patches` patches (what its processor does for a square image)."""
    resample = getattr(processor, "resample", None)
    mode = transforms.InterpolationMode[Image.Resampling(Image.BICUBIC if resample is None else resample).name]
    steps: list[Any] = []
    if getattr(processor, "do_resize", True):
        size = processor.size
        if isinstance(getattr(processor, "max_num_patches", None), int):
            side = processor.patch_size * math.isqrt(processor.max_num_patches)
            steps.append(transforms.Resize((side, side), interpolation=mode))
        elif size is None:
            raise ValueError("unsupported image processor: it resizes, but gives no size")
        elif size.get("shortest_edge"):
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


def dual_encoder_class(model_type: str) -> type | None:
    """The transformers class AutoModel builds for `model_type` when it is a contrastive dual encoder: it has
    `get_image_features` and `get_text_features`, and its forward computes its own pairing loss (`return_loss`:
    CLIP's softmax, SigLIP's sigmoid), which rules out captioners and chat models that embed images too; else
    None. Imports that one model's module only."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(model_type)
    name = name[0] if isinstance(name, (tuple, list)) else name
    if not isinstance(name, str):
        return None
    try:
        cls = getattr(transformers, name)
        forward = inspect.signature(cls.forward).parameters
    except (ImportError, AttributeError, TypeError, ValueError):  # a model whose backend is missing
        return None
    dual = all(callable(getattr(cls, m, None)) for m in ("get_image_features", "get_text_features"))
    return cls if dual and "return_loss" in forward else None


def dual_encoder_of(config: dict[str, Any]) -> type | None:
    """The dual-encoder class of a `config.json`: `dual_encoder_class` of its model_type, when the class its
    `architectures` names (what `save_pretrained` recorded) is that class, or it names none; else None (a BLIP
    captioner, `BlipForConditionalGeneration`, shares model_type "blip" with the BLIP dual encoder)."""
    model_type = config.get("model_type")
    cls = dual_encoder_class(model_type) if isinstance(model_type, str) else None
    saved = config.get("architectures")
    if cls is None or (isinstance(saved, list) and saved and cls.__name__ not in saved):
        return None
    return cls


@functools.cache
def dual_encoder_types() -> tuple[str, ...]:
    """Every model_type of the installed transformers that `dual_encoder_class` accepts (for error messages:
    it imports the modules of every model with a text and a vision sub-config, seconds)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    found = []
    for model_type in MODEL_MAPPING_NAMES:
        try:
            sub_configs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
        except (KeyError, ImportError, AttributeError):
            continue
        if {"text_config", "vision_config"} <= set(sub_configs) and dual_encoder_class(model_type):
            found.append(model_type)
    return tuple(sorted(found))


def read_config(folder: Path) -> dict[str, Any]:
    """`config.json` of a Hugging Face dual-encoder directory; a clear error naming it when it is not one (the
    model_type found, and the kinds this platform loads)."""
    path = folder / "config.json"
    config = read_json_object(path, f"not found: {folder} is not a Hugging Face CLIP directory")
    if dual_encoder_of(config) is None:
        saved = config.get("architectures")
        what = f"model_type {config.get('model_type')!r}" + (f" saved as {', '.join(map(str, saved))}" if saved else "")
        raise ValueError(
            f"{path} is not a CLIP config of a kind this platform loads: {what} is not a "
            "contrastive dual encoder (image and text embeddings and a pairing loss). Supported: Hugging Face "
            f"model types {', '.join(dual_encoder_types())}; open_clip folders (open_clip_config.json, or a "
            "weights file with model.json naming an open_clip architecture)"
        )
    return config


def is_clip_dir(folder: Path) -> bool:
    """Whether `folder` has a `config.json` of a dual encoder (`read_config`)."""
    try:
        read_config(folder)
    except (OSError, ValueError):
        return False
    return True


def load(folder: Path, weights: Path | None = None) -> Parts:
    """Load a Hugging Face dual-encoder directory (its `weights` file, by default the one `from_pretrained`
    reads); FileNotFoundError or ValueError naming the missing or faulty file."""
    config_path = folder / "config.json"
    cls = dual_encoder_class(read_config(folder)["model_type"])
    weights = weights or hf_weights_file(folder)
    if weights is None:
        raise FileNotFoundError(
            f"CLIP checkpoint incomplete: {folder / HF_WEIGHTS_FILES[0]} not found (nor {HF_WEIGHTS_FILES[1]})"
        )
    processor_file = image_processor_file(folder, "CLIP checkpoint")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"CLIP checkpoint incomplete: {folder / TOKENIZER_FILES[0]} not found")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        hf = transformers.AutoModel.from_config(config)
    except Exception as exc:
        raise ValueError(f"{config_path} does not give a {cls.__name__}: {exc}") from exc
    load_weights(hf, weights, f"the {cls.__name__} of {config_path}")
    tokenizer, processor = tokenizer_and_image_processor(folder, "CLIP checkpoint")
    text = getattr(config, "text_config", None)
    vocab_size = getattr(text, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens, more than the {vocab_size} of {config_path}"
        )
    try:
        preprocess = image_transform(processor)
    except Exception as exc:
        raise ValueError(f"{processor_file} does not give an image processor: {exc}") from exc
    context = getattr(text, "max_position_embeddings", None) or tokenizer.model_max_length
    mask = config.model_type not in CAUSAL_TEXT and "attention_mask" in tokenizer.model_input_names
    patches = (processor.patch_size, processor.max_num_patches) if hasattr(processor, "max_num_patches") else None
    return Parts(HFClip(hf, mask, patches), preprocess, TextTokenizer(tokenizer, int(context), mask), processor)


def save(parts: Parts, out: Path) -> Path:
    """`save_pretrained` of model, tokenizer and image processor into `out`; return the weights file.
    The safetensors metadata is {"format": "pt"} only: the same weights give the same bytes."""
    parts.model.hf.save_pretrained(out)
    parts.tokenizer.tokenizer.save_pretrained(out)
    parts.image_processor.save_pretrained(out)
    return out / HF_WEIGHTS_FILES[0]
