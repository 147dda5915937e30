"""M^4I, membership inference against image captioners (Hu et al., NeurIPS 2022).

Both attacks learn on a *shadow* captioner whose members and non-members the attacker knows, then
classify the target's outputs:

- MB (metric-based, section 3.2): features are caption metrics between the generated caption and the
  record's reference captions (`metrics.captions`); the paper's code fits a linear SVM with C = 1e5.
- FB (feature-based, section 3.3): a multimodal feature extractor (MFE), trained on shadow data, maps an
  image and a caption into one 256-d space; the feature is |MFE_img(image) - MFE_txt(generated caption)|;
  the classifier (not in the public code) is chosen on a shadow validation split.

The scenario of a (target, shadow) pair says what the attacker had to guess (section 4.3): nothing
(`unrestricted`), the training data's distribution (`data_restricted`), the architecture
(`arch_restricted`), or both. Known flaws of the public code are avoided: shadow non-members are never
target non-members, members and non-members come from one dataset, every choice is seeded, and captions
are tokenised by words (not split on commas).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import torch
from safetensors.torch import load, save
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from m4i_assets.attacks.adaptive import average_over_queries
from m4i_assets.data.images import load_image_tensor
from m4i_assets.data.text import normalise_caption
from m4i_assets.models.device import device_for
from m4i_assets.models.training import SeededBatches, train_loop

MB, FB = "m4i_mb", "m4i_fb"
SCENARIOS = ("unrestricted", "data_restricted", "arch_restricted", "both_restricted")
CLASSIFIER_KINDS = ("svm", "logreg", "mlp")


def scenario_of(target_dataset: str, target_arch: str, shadow_dataset: str, shadow_arch: str) -> str:
    """Which of the four threat scenarios a shadow model puts the attacker in."""
    same_data, same_arch = target_dataset == shadow_dataset, target_arch == shadow_arch
    return SCENARIOS[(not same_data) + 2 * (not same_arch)]


class ShadowClassifier(ClassifierMixin, BaseEstimator):
    """A membership classifier trained on shadow outputs, a scikit-learn estimator (`fit`, `score_samples`,
    `predict`, explicit `random_state`; hyper-parameters only in `__init__`, so `clone` and
    `sklearn.model_selection` work; `fit` sets the attributes ending in `_` afresh).

    Each of `kinds` is fitted on a stratified `1 - val_fraction` of the shadow data; the one with the best
    validation AUC is kept (its validation accuracy is `shadow_accuracy_`) and refitted on all of it.
    Features are standardised first.
    `predict` uses the classifier's own threshold, chosen on shadow data only: the paper's attack
    success rate is the accuracy of these predictions on the target's candidates.
    """

    def __init__(
        self,
        kinds: tuple[str, ...] = ("svm",),
        svm_c: float = 1e5,
        val_fraction: float = 0.2,
        random_state: int = 0,
    ) -> None:
        self.kinds, self.svm_c, self.val_fraction, self.random_state = kinds, svm_c, val_fraction, random_state

    def _make(self, kind: str):
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        model = {
            # The primal solver converges at the paper's C = 1e5, where liblinear's dual one does not.
            "svm": lambda: LinearSVC(C=self.svm_c, dual=False, max_iter=10_000, random_state=self.random_state),
            "logreg": lambda: LogisticRegression(C=1.0, max_iter=5_000),
            "mlp": lambda: MLPClassifier(
                hidden_layer_sizes=(128,), alpha=1e-3, early_stopping=True, max_iter=500, random_state=self.random_state
            ),
        }[kind]()
        return make_pipeline(StandardScaler(), model)

    def fit(self, X: np.ndarray, y: np.ndarray) -> ShadowClassifier:
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import train_test_split

        unknown = [k for k in self.kinds if k not in CLASSIFIER_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown classifier kinds {unknown or self.kinds}; known: {list(CLASSIFIER_KINDS)}")
        y = np.asarray(y, dtype=int)
        if len(np.unique(y)) != 2:
            raise ValueError("shadow data needs both members and non-members")
        self.classes_ = np.array([False, True])
        X_tr, X_val, y_tr, y_val = train_test_split(
            X, y, test_size=self.val_fraction, stratify=y, random_state=self.random_state
        )
        held_out = {kind: self._make(kind).fit(X_tr, y_tr) for kind in self.kinds}
        self.validation_auc_ = {k: float(roc_auc_score(y_val, _scores(m, X_val))) for k, m in held_out.items()}
        self.kind_ = max(self.kinds, key=lambda k: self.validation_auc_[k])
        # Held-out accuracy of the chosen kind: training accuracy would flatter an overfitted classifier.
        self.shadow_accuracy_ = float((held_out[self.kind_].predict(X_val) == y_val).mean())
        self.model_ = self._make(self.kind_).fit(X, y)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Membership score, higher = more likely a member (SVM margin or P(member))."""
        return _scores(self.model_, X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict(X).astype(bool)

    def to_bytes(self) -> bytes:
        import joblib

        buffer = io.BytesIO()
        joblib.dump(self, buffer)
        return buffer.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> ShadowClassifier:
        import joblib

        return joblib.load(io.BytesIO(data))


def _scores(model, X: np.ndarray) -> np.ndarray:
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(X), dtype=np.float64)
    return np.asarray(model.predict_proba(X)[:, 1], dtype=np.float64)


@dataclass(frozen=True)
class MfeSpec:
    """The multimodal feature extractor's shape and training recipe (`seed` fixes init and batches)."""

    dim: int = 256
    image_size: int = 32
    text_hidden: int = 512
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    temperature: float = 0.1
    seed: int = 0


class MultimodalFeatureExtractor(nn.Module):
    """Image branch (CNN -> linear -> dim) and text branch (bag of words -> MLP -> dim), L2-normalised.

    The paper's image branch is a frozen ImageNet backbone; no pretrained weights can be fetched offline,
    so the CNN trains with the rest. The paper pulls matched pairs together with an MSE, which a constant
    map satisfies; a symmetric contrastive loss (matched pairs together, others apart) cannot collapse."""

    def __init__(self, vocab_size: int, spec: MfeSpec) -> None:
        super().__init__()
        side = spec.image_size
        for _ in range(3):
            side = (side + 1) // 2  # each stride-2 convolution halves the side, rounding up
        self.image_branch = nn.Sequential(  # strided convolutions: cheap enough to train per shadow on a CPU
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * side * side, spec.dim),
        )  # fmt: skip
        self.text_branch = nn.Sequential(
            nn.Linear(vocab_size, spec.text_hidden), nn.ReLU(), nn.Linear(spec.text_hidden, spec.dim)
        )

    def image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_branch(images), dim=-1)

    def text(self, bows: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_branch(bows), dim=-1)


@dataclass
class Mfe:
    """A trained MFE with its vocabulary and recipe; `quality` is its image-to-text retrieval on held-out pairs
    (`retrieval_quality`), kept with it so that a weak extractor is visible wherever FB is reported."""

    model: MultimodalFeatureExtractor
    words: tuple[str, ...]
    spec: MfeSpec
    quality: dict = field(default_factory=dict)

    def bag_of_words(self, captions: list[str]) -> torch.Tensor:
        """Word counts over the MFE's vocabulary (words it never saw are dropped), L1-normalised."""
        index = {w: i for i, w in enumerate(self.words)}
        bows = torch.zeros(len(captions), len(self.words))
        for row, caption in enumerate(captions):
            for word in normalise_caption(caption).split():
                if word in index:
                    bows[row, index[word]] += 1
        return bows / bows.sum(dim=1, keepdim=True).clamp(min=1)

    def to_bytes(self) -> bytes:
        # One metadata key: safetensors writes a map's keys in varying order, and the bytes must not vary.
        meta = {"mfe": json.dumps({"spec": asdict(self.spec), "words": list(self.words), "quality": self.quality})}
        return save({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Mfe:
        meta = json.loads(_safetensors_metadata(data)["mfe"])
        spec, words = MfeSpec(**meta["spec"]), tuple(meta["words"])
        model = MultimodalFeatureExtractor(len(words), spec)
        model.load_state_dict(load(data), strict=True)
        return cls(model.eval(), words, spec, meta.get("quality", {}))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


def train_mfe(image_uris: list[str], captions: list[str], spec: MfeSpec, device: str | None = None) -> Mfe:
    """Fit the MFE on the attacker's (image, reference caption) pairs (symmetric contrastive loss, the platform's
    one training loop `models.training.train_loop`)."""

    torch.manual_seed(spec.seed)
    words = tuple(sorted({w for c in captions for w in normalise_caption(c).split()}))
    mfe = Mfe(MultimodalFeatureExtractor(len(words), spec), words, spec)
    dev = device_for(device)
    images, bows = load_image_tensor(image_uris, spec.image_size), mfe.bag_of_words(captions)
    model = mfe.model.to(dev).train()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = model.image(images[idx].to(dev)) @ model.text(bows[idx].to(dev)).T / spec.temperature
        target = torch.arange(len(idx), device=dev)
        return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2

    train_loop(model, torch.optim.Adam(model.parameters(), lr=spec.lr), spec.epochs,
               SeededBatches(len(images), spec.batch_size, spec.seed), batch_loss)  # fmt: skip
    mfe.model = model.cpu().eval()
    return mfe


@torch.no_grad()
def fb_features(mfe: Mfe, image_uris: list[str], generated: list[str], batch_size: int = 256) -> np.ndarray:
    """FB step 2: |MFE_img(image) - MFE_txt(generated caption)| per record, shape (n, dim)."""

    out = []
    for start in range(0, len(image_uris), batch_size):
        images = load_image_tensor(image_uris[start : start + batch_size], mfe.spec.image_size)
        bows = mfe.bag_of_words(generated[start : start + batch_size])
        out.append((mfe.model.image(images) - mfe.model.text(bows)).abs().numpy())
    return np.concatenate(out) if out else np.zeros((0, mfe.spec.dim))


@torch.no_grad()
def retrieval_quality(mfe: Mfe, image_uris: list[str], captions: list[str], ks: tuple[int, ...] = (1, 5)) -> dict:
    """How well the MFE tells whether a caption describes an image, on pairs it was not fit on: image-to-text
    recall@k (each image's own reference caption among the k most similar of all the pairs' captions) and its
    chance level k / n. An extractor near chance cannot give FB a signal (M^4I section 3.3 assumes a strong one)."""
    n = len(image_uris)
    if n < 2:
        return {}
    images = load_image_tensor(image_uris, mfe.spec.image_size)
    similarity = mfe.model.image(images) @ mfe.model.text(mfe.bag_of_words(captions)).T
    rank = (similarity > similarity.diagonal()[:, None]).sum(dim=1)  # captions scored above the image's own
    quality = {"n_pairs": n}
    for k in ks:
        quality[f"recall@{k}"] = float((rank < k).float().mean())
        quality[f"chance@{k}"] = min(k, n) / n
    return quality


def attacker_split(is_member: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of a shadow's records, each with half its members and half its non-members
    (masks): one for the MFE, the other for the FB classifier, so the classifier never learns from records
    the MFE was fit on."""
    is_member = np.asarray(is_member, dtype=bool)
    first = np.zeros(len(is_member), dtype=bool)
    rng = np.random.default_rng(seed)
    for cls in (True, False):
        idx = np.flatnonzero(is_member == cls)
        first[rng.permutation(idx)[: len(idx) // 2]] = True
    return first, ~first


@dataclass(frozen=True)
class AttackModels:
    """What one shadow captioner teaches the attacker (sections 3.2-3.3): the MB classifier, the MFE and the FB
    classifier, and the masks of the shadow records the MFE and the FB classifier were fit on."""

    mb: ShadowClassifier
    mfe: Mfe
    fb: ShadowClassifier
    mfe_part: np.ndarray
    fb_part: np.ndarray


def train_attack_models(
    metrics: np.ndarray,
    image_uris: list[str],
    captions: list[str],
    generated: list[str],
    is_member: np.ndarray,
    mb: ShadowClassifier,
    fb: ShadowClassifier,
    mfe_spec: MfeSpec,
    seed: int,
    device: str | None = None,
) -> AttackModels:
    """Fit the attacker's models on one shadow captioner's records (its caption `metrics`, images, reference and
    `generated` captions, ground truth): `mb` on every record's caption metrics; the MFE on a seeded half
    (`attacker_split`) and `fb` on |MFE_img - MFE_txt(generated)| of the other half, so the FB classifier never
    learns from a record the MFE was fit on; the MFE's retrieval quality is measured on that other half (with its
    reference captions), which it never saw."""
    y = np.asarray(is_member, dtype=bool)
    mb.fit(metrics, y)
    mfe_part, fb_part = attacker_split(y, seed)
    mfe_rows, fb_rows = np.flatnonzero(mfe_part), np.flatnonzero(fb_part)
    mfe = train_mfe([image_uris[i] for i in mfe_rows], [captions[i] for i in mfe_rows], mfe_spec, device)
    mfe.quality = retrieval_quality(mfe, [image_uris[i] for i in fb_rows], [captions[i] for i in fb_rows])
    fb.fit(fb_features(mfe, [image_uris[i] for i in fb_rows], [generated[i] for i in fb_rows]), y[fb_part])
    return AttackModels(mb, mfe, fb, mfe_part, fb_part)


WHITE_BOX = "white_box"  # the scenario of m4i_loss: no shadow, the target's own likelihoods


@dataclass(frozen=True)
class Shadow:
    """A shadow captioner as the scenario evaluation sees it: its `models` facts, its attack models and its
    caption NLL of the target's candidates followed by the known non-members."""

    version: str
    dataset: str
    arch: str
    seed: int
    mb: ShadowClassifier
    mfe: Mfe
    fb: ShadowClassifier
    nll: np.ndarray


def scenario_scores(
    version: str,
    target_dataset: str,
    target_arch: str,
    candidates: pl.DataFrame,
    metrics: np.ndarray,
    nll: np.ndarray,
    shadows: list[Shadow],
    queries: list[list[str]],
    seed: int,
) -> pl.DataFrame:
    """Every threat scenario's per-record scores of a target's candidates (section 4.3): `m4i_loss` once (white
    box), then per shadow (i.e. per scenario and shadow seed) MB and FB with the shadow-threshold predictions, and
    `m4i_loss_ref` calibrated by that shadow alone. `candidates` has record_id, image_uri, generated_caption and
    is_member; `metrics` their caption metrics (averaged over the queries); `queries` each query's released captions
    of them (the adaptive attacker's k queries of a sampled-decoding release; FB features averaged over them); `nll`
    the target's NLL of the candidates then the known non-members (as each shadow's `nll`)."""
    from m4i_assets.attacks import caption_loss

    n = candidates.height
    uris = candidates["image_uri"].to_list()

    def frame(attack: str, scenario: str, shadow: Shadow | None, scores: np.ndarray, clf=None, predicted=None):
        return pl.DataFrame({
            "model_version": version, "attack": attack, "scenario": scenario,
            "shadow_version": shadow.version if shadow else "none",
            "shadow_dataset": shadow.dataset if shadow else "none",
            "shadow_arch": shadow.arch if shadow else "none",
            "shadow_seed": shadow.seed if shadow else seed,
            "classifier": clf.kind_ if clf else "none",
            "shadow_accuracy": clf.shadow_accuracy_ if clf else None,
            "record_id": candidates["record_id"], "score": scores, "predicted_member": predicted,
            "is_member": candidates["is_member"],
        }, schema_overrides={"shadow_accuracy": pl.Float64, "predicted_member": pl.Boolean})  # fmt: skip

    frames = [frame(caption_loss.LOSS, WHITE_BOX, None, caption_loss.loss_scores(nll[:n]))]
    for shadow in shadows:
        scenario = scenario_of(target_dataset, target_arch, shadow.dataset, shadow.arch)
        fb = average_over_queries([fb_features(shadow.mfe, uris, q) for q in queries])
        for attack, clf, X in ((MB, shadow.mb, metrics), (FB, shadow.fb, fb)):
            frames.append(frame(attack, scenario, shadow, clf.score_samples(X), clf, clf.predict(X)))
        ref = caption_loss.loss_ref_scores(nll, shadow.nll[:, None])[:n]
        frames.append(frame(caption_loss.LOSS_REF, scenario, shadow, ref))
    return pl.concat(frames)


def headline_scores(scored: pl.DataFrame, attack: str) -> pl.DataFrame:
    """The `membership_scores` rows of MB or FB: the least restricted scenario's (`SCENARIOS` order: unrestricted
    where a shadow shares the target's dataset and architecture, e.g. a user's captioner whose architecture the
    platform cannot build is attacked by the architecture-restricted shadows), from its first shadow seed; an
    error when there is no shadow at all."""
    rows = scored.filter(pl.col("attack") == attack)
    scenario = next((s for s in SCENARIOS if s in set(rows["scenario"])), None)
    if scenario is None:
        raise LookupError(f"no shadow captioner scored {attack}: the audit has no shadow captioners")
    chosen = rows.filter(pl.col("scenario") == scenario)
    return chosen.filter(pl.col("shadow_seed") == chosen["shadow_seed"].min())
