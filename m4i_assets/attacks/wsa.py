"""WSA, the weakly supervised attack (Ko et al., ICCV 2023, section 3.4).

1. Threshold tau = mean + lambda * std of the known non-members' CS (paper: lambda = 1.5).
2. Candidates with CS >= tau become pseudo-members.
3. An MLP on concat[f_img, f_txt] learns pseudo-members (1) vs known non-members (0), class-balanced
   (the larger class is subsampled to the smaller), paper architecture d -> 512 -> 256 -> 128 -> 2,
   ReLU, Adam lr 1e-3, batch 32, at most 15 epochs, early stopping with patience 3 on a 10%
   validation split. Score = P(member).
The classifier follows scikit-learn's estimator shape: `fit(X, y)`, `predict_proba(X)`, explicit
`random_state`.
"""

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load, save

ATTACK_ID = "wsa"


@dataclass(frozen=True)
class PseudoLabels:
    tau: float
    is_pseudo_member: np.ndarray  # over the candidate pool, in its order
    rule: str  # "threshold" (the paper's), or "top_k" when the threshold kept fewer than the minimum

    def error_rate(self, is_member: np.ndarray) -> float:
        """Share of pseudo-members that are not members (NaN when there are none)."""
        chosen = self.is_pseudo_member
        return float((~is_member[chosen]).mean()) if chosen.any() else float("nan")


def pseudo_label(
    cs_candidates: np.ndarray, cs_known_nonmembers: np.ndarray, lam: float = 1.5, min_members: int = 0
) -> PseudoLabels:
    """Steps 1-2: tau from the known non-members, pseudo-members among the candidates.

    The rule assumes roughly Gaussian non-member similarities. When they are skewed (a long lower
    tail inflates the std), tau can exceed every candidate; then the `min_members` candidates with
    the highest CS become the pseudo-members instead (rule "top_k"), so the attack still trains and
    the fallback is recorded rather than hidden."""
    tau = float(cs_known_nonmembers.mean() + lam * cs_known_nonmembers.std())
    chosen = cs_candidates >= tau
    if chosen.sum() >= min_members:
        return PseudoLabels(tau=tau, is_pseudo_member=chosen, rule="threshold")
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


class WsaClassifier:
    """The paper's attack MLP with class balancing and early stopping."""

    def __init__(
        self, max_epochs: int = 15, patience: int = 3, batch_size: int = 32, lr: float = 1e-3,
        val_fraction: float = 0.1, random_state: int = 0,
    ) -> None:  # fmt: skip
        self.max_epochs, self.patience, self.batch_size, self.lr = max_epochs, patience, batch_size, lr
        self.val_fraction, self.random_state = val_fraction, random_state
        self.model_: torch.nn.Sequential | None = None
        self.history_: list[dict[str, float]] = []

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
        val, train = idx[:n_val], idx[n_val:]
        torch.manual_seed(self.random_state)
        model = _mlp(X.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)
        gen = torch.Generator().manual_seed(self.random_state)
        best, best_state, waited = np.inf, None, 0
        for epoch in range(self.max_epochs):
            model.train()
            order = torch.as_tensor(train)[torch.randperm(len(train), generator=gen)]
            for start in range(0, len(order), self.batch_size):
                b = order[start : start + self.batch_size]
                loss = torch.nn.functional.cross_entropy(model(Xt[b]), yt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                val_loss = float(torch.nn.functional.cross_entropy(model(Xt[val]), yt[val]))
            self.history_.append({"epoch": epoch, "val_loss": val_loss})
            if val_loss < best - 1e-6:
                best, waited = val_loss, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if waited >= self.patience:
                    break
        model.load_state_dict(best_state)
        self.model_ = model.eval()
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if self.model_ is None:
            raise RuntimeError("WsaClassifier is not fitted")
        with torch.no_grad():
            return torch.softmax(self.model_(torch.as_tensor(X, dtype=torch.float32)), dim=1).numpy()

    def to_bytes(self) -> bytes:
        """The fitted MLP as safetensors bytes (hashable, loadable with `from_bytes`)."""
        return save({k: v.contiguous() for k, v in self.model_.state_dict().items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "WsaClassifier":
        state = load(data)
        clf = cls()
        clf.model_ = _mlp(state["0.weight"].shape[1])
        clf.model_.load_state_dict(state)
        clf.model_.eval()
        return clf


def wsa_features(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """The attack model's input: concat[f_img, f_txt]."""
    return np.concatenate([image_emb, text_emb], axis=1)
