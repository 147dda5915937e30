"""Word-level vocabularies built offline from training captions, shared by the captioners and the Hugging
Face CLIPs: one tokenisation (the caption metrics' normalisation) and one Hugging Face tokenizer builder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import tokenizers
import transformers

from m4i_assets.data.text import PUNCTUATION, normalise_caption


def tokenize(text: str) -> list[str]:
    """The words of a caption under the caption metrics' normalisation (one tokenisation for both)."""
    return normalise_caption(text).split()


def caption_words(captions: Sequence[str], min_count: int = 1) -> tuple[str, ...]:
    """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
    counts = Counter(w for c in captions for w in tokenize(c))
    return tuple(sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)))


def word_level_tokenizer(
    words: Sequence[str], pad: str, bos: str, eos: str, unk: str
) -> transformers.PreTrainedTokenizerFast:
    """A Hugging Face tokenizer over `words` (index = id, the four specials among them): the captions'
    normalisation, one id per word, `bos ... eos` around each text, no padding unless asked."""
    ids = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(ids, unk_token=unk))
    tok.normalizer = tokenizers.normalizers.Sequence(
        [
            tokenizers.normalizers.Lowercase(),
            tokenizers.normalizers.Replace(tokenizers.Regex(PUNCTUATION.pattern), " "),
        ]
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, ids[bos]), (eos, ids[eos])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk
    )
