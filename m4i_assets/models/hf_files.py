"""What every Hugging Face directory the platform loads has, whichever model family it holds: a tokenizer and an
image processor, saved beside the model by `save_pretrained` (of the processor, or of each part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers

from m4i_assets.models.checkpoints import image_processor_file


def tokenizer_and_image_processor(folder: Path, what: str) -> tuple[Any, Any]:
    """The tokenizer and image processor of a directory, as `AutoProcessor` gives them (else, or when it fails,
    `AutoTokenizer` and `AutoImageProcessor`); a FileNotFoundError ("`what` incomplete") naming a missing
    `tokenizer_config.json` or image processor file, a ValueError naming the files that do not load."""
    if not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{what} incomplete: {folder / 'tokenizer_config.json'} not found")
    processor_file = image_processor_file(folder, what)
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
        tokenizer, image_processor = processor.tokenizer, processor.image_processor
        if tokenizer is not None and image_processor is not None:
            return tokenizer, image_processor
    except Exception:  # the separate loaders below name the file that fails
        pass
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise ValueError(f"the tokenizer files in {folder} (tokenizer_config.json, ...) do not load: {exc}") from exc
    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    except Exception as exc:
        raise ValueError(f"{processor_file} does not give an image processor: {exc}") from exc
    return tokenizer, image_processor
