"""WSA, the weakly supervised attack (Ko et al., ICCV 2023, section 3.4), cross-fitted.

1. A threshold tau from the known non-members' CS alone: by default their empirical (1 - alpha) quantile
   (alpha = 0.05: at most 5% of non-members pass it, whatever the shape of their CS distribution); the
   paper's mean + lambda * std (lambda = 1.5) is the `gaussian` rule, which misfires when that
   distribution is skewed.
2. Candidates with CS >= tau become pseudo-members.
3. An MLP learns pseudo-members (1) vs known non-members (0), class-balanced (the larger class is
   subsampled to the smaller), paper architecture d -> 512 -> 256 -> 128 -> 2, ReLU, Adam lr 1e-3, batch 32,
   at most 15 epochs, early stopping with patience 3 on a 10% validation split. Score = P(member).
Never score a record with a model fit on it (README, Rules of evidence): the candidates are split into K seeded
folds; fold k's scores come from an MLP trained on the pseudo-members of the other folds
(`CrossFittedWsa`). Features are configurable (`wsa_features`): the paper's concat[f_img, f_txt], the
element-wise product f_img * f_txt (whose sum is CS), and CS and the augmentation deltas.
The classifier is a scikit-learn estimator (`fit(X, y)`, `predict_proba(X)`, explicit `random_state`), trained by
the platform's one training loop (`models.training.train_loop`).
"""

import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load, save
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from m4i_assets.models.training import EarlyStopping, SeededBatches, train_loop

TAU_RULES = ("quantile", "gaussian")
FEATURES = ("concat", "product", "cs", "deltas")


@dataclass(frozen=True)
class PseudoLabels:
    tau: float
    is_pseudo_member: np.ndarray  # over the candidate pool, in its order
    rule: str  # "quantile" or "gaussian" (the threshold rule), or "top_k" when it kept fewer than the minimum

    def error_rate(self, is_member: np.ndarray) -> float:
        """Share of pseudo-members that are not members (NaN when there are none)."""
        chosen = self.is_pseudo_member
        return float((~is_member[chosen]).mean()) if chosen.any() else float("nan")

    def training_set_error_rate(self, is_member: np.ndarray, n_known_nonmembers: int) -> float:
        """The paper's pseudo-label error rate: wrong labels over the attack model's whole training set
        (pseudo-members plus known non-members, whose labels are right by construction)."""
        chosen = self.is_pseudo_member
        return float((~is_member[chosen]).sum() / max(1, chosen.sum() + n_known_nonmembers))


def threshold(cs_known_nonmembers: np.ndarray, rule: str = "quantile", alpha: float = 0.05, lam: float = 1.5) -> float:
    """Step 1: tau from the known non-members alone: their empirical (1 - alpha) quantile, or (`gaussian`,
    the paper's) mean + lam * std."""
    if rule == "quantile":
        if not 0 < alpha < 1:
            raise ValueError(f"wsa_alpha must lie in (0, 1), got {alpha}")
        return float(np.quantile(cs_known_nonmembers, 1 - alpha))
    if rule == "gaussian":
        return float(cs_known_nonmembers.mean() + lam * cs_known_nonmembers.std())
    raise ValueError(f"unknown WSA tau rule {rule!r}; expected one of {TAU_RULES}")


def pseudo_label(
    cs_candidates: np.ndarray, cs_known_nonmembers: np.ndarray, rule: str = "quantile", alpha: float = 0.05,
    lam: float = 1.5, min_members: int = 0,
) -> PseudoLabels:  # fmt: skip
    """Steps 1-2: tau from the known non-members, pseudo-members among the candidates.

    When tau keeps fewer than `min_members` candidates, the `min_members` candidates with the highest CS
    become the pseudo-members instead (rule "top_k"), so the attack still trains and the fallback is
    recorded rather than hidden. Neither step looks at any candidate's label."""
    tau = threshold(cs_known_nonmembers, rule, alpha, lam)
    chosen = cs_candidates >= tau
    if chosen.sum() >= min_members:
        return PseudoLabels(tau=tau, is_pseudo_member=chosen, rule=rule)
    top = np.argsort(-cs_candidates, kind="mergesort")[:min_members]
    chosen = np.zeros(len(cs_candidates), dtype=bool)
    chosen[top] = True
    return PseudoLabels(tau=tau, is_pseudo_member=chosen, rule="top_k")


def _mlp(d: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(d, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 2),
    )  # fmt: skip


class WsaClassifier(ClassifierMixin, BaseEstimator):
    """The paper's attack MLP with class balancing and early stopping, a scikit-learn estimator: the
    hyper-parameters are `__init__`'s (so `get_params`, `clone` and `sklearn.model_selection` work); `fit` sets
    `model_`, `history_` (validation loss per epoch) and `classes_` afresh each time."""

    def __init__(
        self, max_epochs: int = 15, patience: int = 3, batch_size: int = 32, lr: float = 1e-3,
        val_fraction: float = 0.1, random_state: int = 0,
    ) -> None:  # fmt: skip
        self.max_epochs, self.patience, self.batch_size, self.lr = max_epochs, patience, batch_size, lr
        self.val_fraction, self.random_state = val_fraction, random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> "WsaClassifier":
        y = np.asarray(y, dtype=np.int64)
        n_pos, n_neg = int(y.sum()), int((1 - y).sum())
        if min(n_pos, n_neg) < 2:
            raise ValueError(f"WSA needs at least 2 examples of each class, got {n_pos} positive, {n_neg} negative")
        rng = np.random.default_rng(self.random_state)
        k = min(n_pos, n_neg)  # class balance: subsample the larger class
        idx = np.r_[
            rng.choice(np.flatnonzero(y == 1), k, replace=False), rng.choice(np.flatnonzero(y == 0), k, replace=False)
        ]
        rng.shuffle(idx)
        n_val = max(2, int(round(self.val_fraction * len(idx))))
        val, train = idx[:n_val], torch.as_tensor(idx[n_val:])
        torch.manual_seed(self.random_state)
        model = _mlp(X.shape[1])
        Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)

        def batch_loss(positions: torch.Tensor) -> torch.Tensor:
            b = train[positions]
            return torch.nn.functional.cross_entropy(model(Xt[b]), yt[b])

        @torch.no_grad()
        def validation_loss() -> float:
            model.eval()
            return float(torch.nn.functional.cross_entropy(model(Xt[val]), yt[val]))

        stopping = EarlyStopping(self.patience, min_delta=1e-6)
        train_loop(model, torch.optim.Adam(model.parameters(), lr=self.lr), self.max_epochs,
                   SeededBatches(len(train), self.batch_size, self.random_state), batch_loss,
                   validation_loss=validation_loss, stopping=stopping)  # fmt: skip
        self.history_ = [{"epoch": epoch, "val_loss": loss} for epoch, loss in enumerate(stopping.losses)]
        self.model_ = model.eval()
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "model_")
        with torch.no_grad():
            return torch.softmax(self.model_(torch.as_tensor(X, dtype=torch.float32)), dim=1).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def to_bytes(self) -> bytes:
        """The fitted MLP as safetensors bytes (hashable, loadable with `from_bytes`)."""
        return save({k: v.contiguous() for k, v in self.model_.state_dict().items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "WsaClassifier":
        """A fitted classifier from `to_bytes` (its training history is not stored: `history_` is empty)."""
        state = load(data)
        clf = cls()
        clf.model_ = _mlp(state["0.weight"].shape[1])
        clf.model_.load_state_dict(state)
        clf.model_.eval()
        clf.history_, clf.classes_ = [], np.array([0, 1])
        return clf


def wsa_features(
    image_emb: np.ndarray, text_emb: np.ndarray, kinds: tuple[str, ...] = ("concat",), deltas: np.ndarray | None = None
) -> np.ndarray:
    """The attack model's input, side by side in `kinds` order: `concat` [f_img, f_txt] (the paper's),
    `product` f_img * f_txt, `cs` the cosine similarity, `deltas` the augmentation deltas (n, K)."""
    unknown = [k for k in kinds if k not in FEATURES]
    if unknown or not kinds:
        raise ValueError(f"unknown WSA features {unknown or kinds}; known: {list(FEATURES)}")
    a = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    b = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    parts = {
        "concat": lambda: np.c_[image_emb, text_emb],
        "product": lambda: a * b,
        "cs": lambda: (a * b).sum(axis=1, keepdims=True),
        "deltas": lambda: _deltas(deltas, len(a)),
    }
    return np.concatenate([parts[k]() for k in kinds], axis=1).astype(np.float32)


def _deltas(deltas: np.ndarray | None, n: int) -> np.ndarray:
    if deltas is None or deltas.shape[0] != n:
        raise ValueError("the `deltas` WSA feature needs the records' augmentation deltas (n, K)")
    return deltas


def folds_of(n: int, k: int, seed: int) -> np.ndarray:
    """Seeded fold of each of n records (in their order), sizes differing by at most one."""
    if k < 2 or k > n:
        raise ValueError(f"cross-fitting needs 2 <= folds <= records, got {k} folds for {n} records")
    return np.random.default_rng(seed).permutation(n) % k


class CrossFittedWsa:
    """One `WsaClassifier` per fold: fold k's is fit on the pseudo-members outside fold k and the known
    non-members outside fold k, and scores only the candidates (`score`) and known non-members
    (`score_known`) in fold k."""

    def __init__(self, folds: np.ndarray, known_folds: np.ndarray, models: list[WsaClassifier]) -> None:
        self.folds, self.known_folds, self.models = np.array(folds), np.array(known_folds), models

    @classmethod
    def fit(
        cls, X_candidates: np.ndarray, is_pseudo_member: np.ndarray, X_known: np.ndarray, folds: np.ndarray,
        known_folds: np.ndarray, random_state: int = 0,
    ) -> "CrossFittedWsa":  # fmt: skip
        models = []
        for k in range(int(folds.max()) + 1):
            pos, neg = X_candidates[is_pseudo_member & (folds != k)], X_known[known_folds != k]
            X = np.r_[pos, neg]
            y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            models.append(WsaClassifier(random_state=random_state + k).fit(X, y))
        return cls(folds, known_folds, models)

    @staticmethod
    def _by_fold(models: list[WsaClassifier], X: np.ndarray, folds: np.ndarray) -> np.ndarray:
        scores = np.empty(len(X))
        for k, model in enumerate(models):
            held_out = folds == k
            if held_out.any():
                scores[held_out] = model.predict_proba(X[held_out])[:, 1]
        return scores

    def score(self, X_candidates: np.ndarray) -> np.ndarray:
        """P(member) of each candidate under the model of the other folds."""
        return self._by_fold(self.models, X_candidates, self.folds)

    def score_known(self, X_known: np.ndarray) -> np.ndarray:
        """P(member) of each known non-member under the model that did not train on it."""
        return self._by_fold(self.models, X_known, self.known_folds)

    def to_bytes(self) -> bytes:
        tensors = {f"fold{k}.{name}": v.contiguous() for k, m in enumerate(self.models)
                   for name, v in m.model_.state_dict().items()}  # fmt: skip
        tensors["folds"] = torch.as_tensor(self.folds, dtype=torch.int64)
        tensors["known_folds"] = torch.as_tensor(self.known_folds, dtype=torch.int64)
        meta = {"wsa": json.dumps({"n_folds": len(self.models), "epochs": [len(m.history_) for m in self.models]})}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CrossFittedWsa":
        state = load(data)
        folds, known_folds = state.pop("folds").numpy(), state.pop("known_folds").numpy()
        models = []
        for k in range(int(folds.max()) + 1):
            prefix = f"fold{k}."
            models.append(WsaClassifier.from_bytes(save({n[len(prefix):]: v for n, v in state.items()
                                                         if n.startswith(prefix)})))  # fmt: skip
        return cls(folds, known_folds, models)
