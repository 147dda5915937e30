"""Caption text helpers, the one home of caption normalisation: models' vocabularies, attacks and caption metrics
all tokenise captions with `normalise_caption` (Hu et al. 2022, M^4I, section 3)."""

from __future__ import annotations

import re

PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalise_caption(text: str) -> str:
    """Lowercase, replace punctuation by spaces, collapse whitespace (Hu et al. 2022, M^4I, section 3).

    The one tokenisation applied to generated and reference captions alike; tokens are the
    space-separated words of the result.
    """
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())
