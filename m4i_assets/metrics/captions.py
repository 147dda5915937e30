"""Caption similarity features for the metric-based M^4I attack (Hu et al. 2022, M^4I, section 3).

Step 2 of the metric-based attack: for each record, compare the caption the target model *generated*
with the record's *reference* caption(s) using standard captioning metrics, and use the vector of
scores as the record's feature vector (members tend to get captions closer to their references).

Supported metrics, in `METRICS` order, all from maintained implementations (nothing hand-rolled):

- `bleu1`..`bleu4`: cumulative sentence-level BLEU-n, `pycocoevalcap` `Bleu` (its per-sentence
  scores: brevity penalty from the reference length, and its 1e-15 / 1e-9 smoothing of n-gram
  precisions, so a zero n-gram precision gives a value of about 1e-8 or less rather than exactly 0,
  and a caption shorter than n tokens gets a small nonzero BLEU-n).
- `rouge1`, `rouge2`, `rougeL`: F-measure from Google's `rouge-score` (no stemming).
- `cider`: CIDEr-D, `pycocoevalcap` `CiderScorer` (clipped tf-idf n-gram cosine for n = 1..4, Gaussian
  length penalty with sigma 6, times 10). Document frequencies come from a fixed corpus when one is
  given (`cider_corpus`: the audit's population references, so a shadow's and the target's features
  share one idf); otherwise from the references of the records passed in the same call, so values then
  depend on that batch (with a single record every n-gram has zero idf and CIDEr is 0).
- `meteor`: METEOR 1.5, `pycocoevalcap` `Meteor`; it runs a bundled Java jar (offline), so it needs a
  working `java` binary and raises `RuntimeError` when asked for without one. Not in the default set.

Every caption is tokenised by `data.text.normalise_caption` (lowercase, punctuation removed, whitespace
collapsed) and the tokens are joined by single spaces before scoring; `pycocoevalcap`'s
`PTBTokenizer` (Java) is not used. References that normalise to the empty string are dropped.

Multiple references: each metric is the mean over the record's references of its value for that
(generated, reference) pair. BLEU, ROUGE and METEOR score every pair as a single-reference case and
average (the libraries' native multi-reference modes, max-count clipping for BLEU and max over
references for `rouge-score` and METEOR, are not used). CIDEr-D uses `pycocoevalcap`'s native
multi-reference handling, which is itself the mean over references of the per-reference similarity.
An empty generated caption (after normalising) gets all zeros.

Speed (default metrics, measured on one core while another process loaded the machine, captions of
about 40 tokens from the embedded corpus): 1000 records take about 1.5 s with 1 reference each and
about 3.7 s with 5 references each, plus about 1.7 s once per process to import the libraries (`nltk`,
pulled in by `rouge-score`). METEOR adds about 6 s to start its Java process. Results are deterministic.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from m4i_assets.data.text import normalise_caption

METRICS: tuple[str, ...] = (
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "rouge1",
    "rouge2",
    "rougeL",
    "cider",
    "meteor",
)
DEFAULT_METRICS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL", "cider")

_BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")
_ROUGE = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class CiderCorpus:
    """CIDEr-D's document frequencies (n-gram -> number of reference sets containing it) and corpus size."""

    document_frequency: dict
    n_documents: int


def cider_corpus(references: Sequence[Sequence[str]]) -> CiderCorpus:
    """Document frequencies of a fixed corpus of reference sets (one per image), normalised like the metrics."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for refs in references:
        kept = [r for r in (normalise_caption(r) for r in refs) if r]
        if kept:
            scorer.cook_append(None, kept)
    scorer.compute_doc_freq()
    return CiderCorpus(dict(scorer.document_frequency), len(scorer.crefs))


class _SizedList(list):
    """A list whose len() is the fixed corpus size: pycocoevalcap's CIDEr takes log(len(references)) as the
    corpus size of its idf, while it iterates over the scored records only."""

    def __init__(self, items: list, size: int) -> None:
        super().__init__(items)
        self.size = size

    def __len__(self) -> int:
        return self.size


def _cider_scores(gens: list[str], refs: list[list[str]], corpus: CiderCorpus | None) -> np.ndarray:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    if corpus is None:  # every record joins the corpus, so document frequencies cover all references passed in
        _, scores = Cider().compute_score({i: refs[i] for i in range(len(gens))}, {i: [g] for i, g in enumerate(gens)})
        return np.asarray(scores, dtype=np.float64)
    scorer = CiderScorer(n=4, sigma=6.0)
    for g, r in zip(gens, refs):
        scorer.cook_append(g, r)
    scorer.document_frequency = defaultdict(float, corpus.document_frequency)
    scorer.crefs = _SizedList(scorer.crefs, corpus.n_documents)
    return np.asarray(scorer.compute_cider(), dtype=np.float64)


@functools.cache
def java_available() -> bool:
    """Whether `java -version` runs, which `pycocoevalcap`'s METEOR needs."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class _WhitespaceTokenizer:
    """`rouge-score` tokenizer over already-normalised text, so ROUGE sees the same tokens as BLEU."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def _check_inputs(
    generated: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a tuple of metric names, not the string {metrics!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; supported: {list(METRICS)}")
    if len(generated) != len(references):
        raise ValueError(
            f"generated and references must have one entry per record: got {len(generated)} generated "
            f"captions and {len(references)} reference lists"
        )
    gens = [normalise_caption(g) for g in generated]
    refs: list[list[str]] = []
    for i, rs in enumerate(references):
        if isinstance(rs, str):
            raise ValueError(f"references[{i}] must be a list of reference captions, not a string")
        kept = [r for r in (normalise_caption(r) for r in rs) if r]
        if not kept:
            raise ValueError(f"record {i} has no (non-empty) reference caption")
        refs.append(kept)
    return gens, refs


def _mean_by_record(values: Sequence[float], pair_record: np.ndarray, n_records: int) -> np.ndarray:
    """Mean of per-pair values over each record's pairs (0 for records without pairs)."""
    sums = np.bincount(pair_record, weights=np.asarray(values, dtype=np.float64), minlength=n_records)
    counts = np.bincount(pair_record, minlength=n_records)
    return np.divide(sums, counts, out=np.zeros(n_records), where=counts > 0)


def caption_metric_features(
    generated: list[str],
    references: list[list[str]],
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    corpus: CiderCorpus | None = None,
) -> np.ndarray:
    """Per-record caption similarity features (Hu et al. 2022, M^4I, section 3, metric-based attack).

    `generated[i]` is the caption the target model produced for record i and `references[i]` its
    reference captions. Returns float64 of shape (len(generated), len(metrics)), column j holding
    `metrics[j]` averaged over the record's references (see the module docstring for how each
    library handles them). Raises ValueError on unknown metric names, mismatched lengths or a record
    without references, RuntimeError when `meteor` is asked for and `java` is missing.
    """
    gens, refs = _check_inputs(generated, references, metrics)
    n = len(gens)
    out = np.zeros((n, len(metrics)), dtype=np.float64)
    if n == 0 or not metrics:
        return out
    if "meteor" in metrics and not java_available():
        raise RuntimeError("the 'meteor' caption metric needs a working `java` binary (pycocoevalcap's METEOR jar)")

    # (generated, single reference) pairs of records whose generated caption is non-empty.
    pair_record = np.array([i for i, rs in enumerate(refs) if gens[i] for _ in rs], dtype=np.int64)
    pair_gen = [gens[i] for i in pair_record]
    pair_ref = [r for i, rs in enumerate(refs) if gens[i] for r in rs]
    have_pairs = len(pair_record) > 0
    columns: dict[str, np.ndarray] = {}

    if have_pairs and any(m in metrics for m in _BLEU):
        from pycocoevalcap.bleu.bleu import Bleu

        keys = range(len(pair_record))
        _, per_order = Bleu(4).compute_score(
            {k: [pair_ref[k]] for k in keys}, {k: [pair_gen[k]] for k in keys}, verbose=0
        )
        for order, name in enumerate(_BLEU):
            columns[name] = _mean_by_record(per_order[order], pair_record, n)

    rouge_types = [m for m in _ROUGE if m in metrics]
    if have_pairs and rouge_types:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(rouge_types, use_stemmer=False, tokenizer=_WhitespaceTokenizer())
        pair_scores = [scorer.score(r, g) for g, r in zip(pair_gen, pair_ref)]
        for name in rouge_types:
            columns[name] = _mean_by_record([s[name].fmeasure for s in pair_scores], pair_record, n)

    if have_pairs and "cider" in metrics:
        columns["cider"] = _cider_scores(gens, refs, corpus)

    if have_pairs and "meteor" in metrics:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            keys = range(len(pair_record))
            _, pair_scores = meteor.compute_score({k: [pair_ref[k]] for k in keys}, {k: [pair_gen[k]] for k in keys})
        finally:
            del meteor  # closes the Java process
        columns["meteor"] = _mean_by_record(pair_scores, pair_record, n)

    for j, name in enumerate(metrics):
        if name in columns:
            out[:, j] = columns[name]
    out[[not g for g in gens]] = 0.0
    return out
