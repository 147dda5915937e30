"""DP-SGD with Opacus for the project's CLIPs and captioners, and what the reported epsilon means.

Mechanism. The training loop of the model's family (`models.clip.train_clip`, `models.captioner.train_captioner`)
runs unchanged on `PrivateTraining`'s objects: a private copy of the model wrapped in Opacus's GradSampleModule
(per-sample gradients by hooks), a DPOptimizer (flat per-sample clipping to C = `dp_max_grad_norm`, Gaussian
noise of standard deviation sigma * C on the sum, sigma = `dp_noise_multiplier`, divided by the expected
batch size) and Poisson sampling (each training pair enters a step's batch independently with probability
q = 1 / ceil(n / batch_size), ceil(n / batch_size) steps per epoch, as Opacus's DPDataLoader does). A step
whose batch is too small for the loss (empty; a single pair for the contrastive loss, whose gradient is
then exactly zero) is still taken with the noise alone, so every sampled step is the sampled Gaussian
mechanism the accountant counts. The noise and the sampling come from generators seeded from the spec's
seed (`secure_mode=False`: reproducible bytes, not the floating-point-attack-hardened sampler). Training
runs in fp32 (no CUDA autocast under DP).

The private copy (`private_copy`) differs from the model only where Opacus needs it to, and `export` loads
its weights back into the original architecture (strict), so a DP-trained checkpoint is an ordinary
checkpoint of its arch (`load_clip`, `load_captioner`):
- `nn.MultiheadAttention` -> `BatchFirstAttention` (this module: one `in_proj` Linear for q, k, v and the
  `out_proj` Linear, attention by `scaled_dot_product_attention`). Not Opacus's DPMultiheadAttention: with
  batch_first=True (open_clip's layout) it checks a 2-D attn_mask against the batch size and refuses the
  text tower's causal mask; running open_clip's transformers sequence-first instead hands (L, N, E)
  tensors to every Linear in the blocks, and a GradSampleModule built batch-first then computes
  "per-sample" gradients over the L positions (grad_sample of shape (65, ...) for a batch of 4).
- A one-layer batch-first `nn.LSTM` -> `SequenceLSTM` (this module: the same weights as `ih` / `hh` Linears,
  each applied once to the whole sequence, so a sample's gradient is one contraction over time steps; about
  7x faster than Opacus's DPLSTM, which any other nn.LSTM becomes by `ModuleValidator.fix`).
- Batch norm is refused (it mixes the examples of a batch and keeps running statistics): the cnn-lstm
  captioner is built with group norm under DP (`CaptionerSpec.norm`), an open_clip ResNet CLIP is not
  supported, nor are Hugging Face CLIPs (position ids of batch size 1 break per-sample hooks) or vit-gpt2.
- Parameters held directly by a module that has sub-modules are frozen at their seeded initialisation,
  because Opacus computes per-sample gradients per module (a non-leaf module with its own parameters would
  have to be differentiated as a whole, buffers and all). For open_clip's ViT CLIPs these are the top
  level's `positional_embedding`, `text_projection` and `logit_scale` and the vision tower's
  `class_embedding`, `positional_embedding` and `proj`. `train_clip` also freezes open_clip's
  `token_embedding` (49408 x 128): Opacus materialises a dense per-sample gradient of a whole embedding table,
  64 x 49408 x 128 floats (1.6 GB) per step of 64 pairs, 5 to 6 s per step on one CPU thread against under
  1 s with the table frozen. All frozen parameters are listed in the facts (`frozen_parameters`); they never
  see the data, so they leak nothing, and the grid's sigma = 0 point (clipping and sampling, no noise) shows
  what freezing and clipping cost before any noise.

What the reported epsilon covers. `epsilon` is Opacus's PRV accountant (`epsilon_rdp`: its RDP accountant, a
slightly larger upper bound; `epsilon` falls back to it where RDP says more than 150, as the PRV accountant then
needs gigabytes and can return infinity; `accountant` names the one used) for the steps actually taken: (epsilon,
delta = `dp_delta`) for add/remove-one adjacency at the level of one training pair, Poisson sampling at rate q,
noise multiplier sigma, assuming that adding or removing one pair changes the clipped, summed gradient of a step by
at most C. Not accounted, as usual: the choice of hyper-parameters (and of the noise grid itself), the validation
pairs used for early stopping (they are not training pairs; choosing the best epoch is post-processing with respect
to the training pairs), and the frozen parameters (data-independent). `epsilon` is infinite for sigma = 0.

- Captioner (teacher-forced cross-entropy, averaged per caption and then over the batch under DP, so that a
  caption's loss depends on that caption alone): the assumption holds, and `epsilon` is an
  (epsilon, delta)-DP guarantee for the training pairs, for the weights given the vocabulary. The vocabulary
  itself is built from the training captions (`Vocabulary.build`) and saved with the model: it is not
  private (a word that only one training caption has reveals that caption), so the guarantee holds for the
  released model only where the vocabulary is public, e.g. the corpus generator's word lists.
- CLIP (symmetric InfoNCE): the loss does not decompose over examples. Every pair is a negative in the
  softmax of every other pair of its batch, so the "per-sample gradient" Opacus clips for pair i (the
  gradient flowing through pair i's forward computation) depends on every other pair in the batch. Removing
  one pair removes its own clipped term (norm <= C) and can change each of the other B - 1 clipped terms by
  up to 2C: the sensitivity of the noised sum is up to C (2B - 1), not C. Kong, Munoz Medina and Ribero
  (2023, "DP-SGD for non-decomposable objective functions", arXiv 2310.03104) make this point for
  contrastive losses (sensitivity growing with the batch size) and propose Logit-DP, which privatises the
  gradients of the similarity logits instead. Huang et al. (2023, "Safeguarding Data in Multimodal AI: A
  Differentially Private Approach to CLIP Training", arXiv 2306.08173, Dp-CLIP) clip and noise the batch's
  gradient as a whole (per-batch clipping) and analyse privacy and utility under a linear representation
  setting. So for CLIP the reported `epsilon` is the accountant's figure under the decomposability
  assumption, NOT a differential-privacy guarantee; it is comparable across the grid, not an upper bound.
  `epsilon_conservative` is a valid but very loose bound for the same run. Under DP, a CLIP's Poisson batches are
  cut to their first B_max sampled pairs (B_max: the smallest cap that Binomial(n, q) exceeds, over all the
  planned steps, with probability at most delta, so the cut practically never happens; the facts count the
  cut batches). Two batch sums of at most B_max clipped terms differ by at most 2 B_max C, whether or not one
  pair is added, and a pair that is not sampled changes nothing, so every step is the sampled Gaussian mechanism
  with sensitivity 2 B_max C: noise multiplier sigma / (2 B_max) for the accountant (RDP), at delta. This is a
  group-privacy style bound (it charges the whole batch for one pair) and is many orders of magnitude above
  `epsilon`; a meaningful guarantee for the contrastive loss needs a different mechanism (Logit-DP,
  per-batch clipping).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.layers.dp_rnn import DPRNNBase
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

COVERAGE = {
    False: "(epsilon, delta)-DP for the training pairs (sample level, add/remove adjacency, Poisson sampling): "
    "each pair's loss depends on that pair alone; for the weights given the vocabulary, which is built from the "
    "training captions and not private; hyper-parameter selection not accounted.",
    True: "the accountant's figure under the per-example decomposability assumption, which the contrastive loss "
    "breaks: NOT a DP guarantee (see epsilon_conservative and m4i_assets.models.dp).",
}


class BatchFirstAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's interface and state (as `in_proj` / `out_proj` Linears),
    whose Linears always see batch-first inputs, so Opacus's per-sample gradient hooks apply."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, dropout: float, batch_first: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> BatchFirstAttention:
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("DP-SGD supports self-attention with equal q/k/v widths, no bias_k/v, no zero attention")
        bias = mha.in_proj_bias is not None
        out = cls(mha.embed_dim, mha.num_heads, bias, mha.dropout, mha.batch_first)
        with torch.no_grad():
            out.in_proj.weight.copy_(mha.in_proj_weight)
            out.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                out.in_proj.bias.copy_(mha.in_proj_bias)
                out.out_proj.bias.copy_(mha.out_proj.bias)
        return out.to(mha.in_proj_weight.device)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query:
            raise NotImplementedError("BatchFirstAttention is self-attention only (key and value must be query)")
        x = query if self.batch_first else query.transpose(0, 1)
        n, length, width = x.shape
        heads = self.num_heads
        q, k, v = self.in_proj(x).view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        mask = _additive(attn_mask, x.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(n, heads, length, length)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, x.dtype).view(n, 1, 1, length)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask convention (bool True = may not attend, or additive floats) as floats."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class SequenceLSTM(nn.Module):
    """A one-layer, batch-first nn.LSTM whose two weight matrices are each applied once per forward, to the
    whole sequence, by `ih` and `hh` Linears: Opacus's hooks then give a sample's gradient as one contraction
    over the time steps, where Opacus's DPLSTM accumulates a (batch, 4H, in) outer product per step (17 s per
    step of 64 captions of 50 tokens for the cnn-lstm captioner on one CPU thread, against 2.5 s here).

    The recurrence is run twice: once without gradients for the hidden states' values, then with them, the
    recurrent term written as `hh(previous states) - W_hh h_{t-1}` (constant in value, carrying the gradient of
    `hh`'s parameters: the sum over steps of delta_t h_{t-1}) plus `W_hh h_{t-1}` with W_hh detached (carrying
    the gradient to h_{t-1}). Values match nn.LSTM's to float rounding; each sample's gradient depends on that
    sample alone."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or not lstm.bias or lstm.proj_size:
            raise ValueError("SequenceLSTM is a one-layer, one-direction, batch-first LSTM with biases")
        self.hidden_size = lstm.hidden_size
        self.ih = nn.Linear(lstm.input_size, 4 * lstm.hidden_size)
        self.hh = nn.Linear(lstm.hidden_size, 4 * lstm.hidden_size)
        with torch.no_grad():
            for linear, kind in ((self.ih, "ih"), (self.hh, "hh")):
                linear.weight.copy_(getattr(lstm, f"weight_{kind}_l0"))
                linear.bias.copy_(getattr(lstm, f"bias_{kind}_l0"))
        self.to(lstm.weight_ih_l0.device)

    @staticmethod
    def _cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = gates.chunk(4, dim=-1)  # nn.LSTM's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n, steps, _ = x.shape
        zeros = x.new_zeros(n, self.hidden_size)
        h, c = (zeros, zeros) if hx is None else (hx[0][0], hx[1][0])
        inputs = self.ih(x)  # (n, steps, 4H)
        w = self.hh.weight.detach()
        with torch.no_grad():
            hv, cv, previous = h, c, []
            for t in range(steps):
                previous.append(hv)
                hv, cv = self._cell(inputs[:, t] + F.linear(hv, w, self.hh.bias), cv)
        previous = torch.stack(previous, dim=1)
        recurrent = self.hh(previous)  # (n, steps, 4H), the only path to hh's parameters
        outputs = []
        for t in range(steps):
            h, c = self._cell(inputs[:, t] + F.linear(h, w) + (recurrent[:, t] - F.linear(previous[:, t], w)), c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h.unsqueeze(0), c.unsqueeze(0))


LSTM_NAMES = {f"{kind}_{m}_l0": f"{m}.{kind}" for kind in ("weight", "bias") for m in ("ih", "hh")}


def original_state(private: nn.Module, target_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The private copy's weights under the original architecture's state-dict keys."""
    state = private.state_dict()
    out = {}
    for key in target_keys:
        prefix, _, leaf = key.rpartition(".")
        renamed = {"in_proj_weight": "in_proj.weight", "in_proj_bias": "in_proj.bias", **LSTM_NAMES}.get(leaf)
        if key in state:
            out[key] = state[key]
        elif renamed and f"{prefix}.{renamed}".lstrip(".") in state:
            out[key] = state[f"{prefix}.{renamed}".lstrip(".")]
    return out


def private_copy(model: nn.Module, freeze: Iterable[str] = ()) -> tuple[nn.Module, list[str]]:
    """A copy of `model` that Opacus can train, and the names of the parameters frozen in it (see the module
    docstring; `freeze` names more parameters to freeze). A ValueError names what cannot be made private."""
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ValueError(f"DP-SGD cannot train batch norm (it mixes the examples of a batch): {norms[:4]}")
    private = copy.deepcopy(model)
    for name, module in list(private.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            _replace(private, name, BatchFirstAttention.from_torch(module))
        elif type(module) is nn.LSTM and module.num_layers == 1 and not module.bidirectional and module.batch_first:
            _replace(private, name, SequenceLSTM(module))
    private = ModuleValidator.fix(private)  # any other nn.LSTM -> Opacus's DPLSTM
    frozen = []
    for name in freeze:
        private.get_parameter(name).requires_grad_(False)
        frozen.append(name)
    for name, module in private.named_modules():
        if isinstance(module, DPRNNBase) or next(module.children(), None) is None:
            continue  # a DPLSTM's own parameters are its cells' parameters under nn.LSTM's names
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(f"{name}.{pname}" if name else pname)
    errors = ModuleValidator.validate(private, strict=False)
    if errors:
        raise ValueError(f"Opacus cannot compute per-sample gradients for this model: {errors[:2]}")
    expected = model.state_dict()
    mapped = original_state(private, expected)
    if set(mapped) != set(expected) or any(mapped[k].shape != expected[k].shape for k in expected):
        raise ValueError(
            f"the private copy does not map back onto the model: missing {sorted(set(expected) - set(mapped))[:4]}"
        )
    return private, frozen


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """Epsilon at `delta` of `steps` sampled Gaussian steps (Opacus's accountant); infinite without noise."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


PRV_UP_TO = 150.0  # the RDP epsilon above which the PRV accountant is not run (memory, infinite results)


def reported_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> dict[str, Any]:
    """{"epsilon", "accountant", "epsilon_rdp"}: PRV's epsilon where it is cheap and finite, else RDP's."""
    rdp = dp_epsilon(noise_multiplier, sample_rate, steps, delta, "rdp")
    out = {"epsilon": rdp, "accountant": "rdp", "epsilon_rdp": rdp}
    if math.isfinite(rdp) and rdp <= PRV_UP_TO:
        try:
            prv = dp_epsilon(noise_multiplier, sample_rate, steps, delta, "prv")
        except (ValueError, RuntimeError, MemoryError):
            prv = math.inf
        if math.isfinite(prv):
            out.update(epsilon=min(prv, rdp), accountant="prv")
    return out


def batch_cap(n: int, sample_rate: float, steps: int, tail: float) -> int:
    """The smallest b with steps * P(Binomial(n, sample_rate) > b) <= tail."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = torch.distributions.Binomial(n, probs=torch.tensor(sample_rate, dtype=torch.float64)).log_prob(k)
    log_above = torch.logcumsumexp(log_pmf.flip(0), 0).flip(0)  # log P(X >= k)
    ok = torch.nonzero(math.log(max(steps, 1)) + log_above <= math.log(tail)).flatten()
    return max(1, int(ok[0]) - 1) if len(ok) else n  # P(X > b) = P(X >= b + 1)


def conservative_epsilon(noise_multiplier: float, sample_rate: float, steps: int, cap: int, delta: float) -> float:
    """The valid, loose epsilon of a loss that couples the pairs of a batch cut to `cap` pairs (module docstring):
    sensitivity 2 cap C, so the RDP accountant at noise multiplier sigma / (2 cap)."""
    return dp_epsilon(noise_multiplier / (2 * cap), sample_rate, steps, delta, "rdp")


class PrivateTraining:
    """Opacus's objects for one training run: `module` (forward through it), `optimizer`, `batches()` (Poisson
    batches of positions in range(n)), `noise_step()` for a batch too small for the loss, `export(model)`.
    `coupled`: the loss couples the pairs of a batch (contrastive): batches are cut to `batch_cap` pairs and
    the facts carry the conservative epsilon (module docstring). `freeze`: parameters to keep at their values."""

    def __init__(
        self,
        model: nn.Module,
        optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        n: int,
        batch_size: int,
        epochs: int,
        defense: Any,  # a models.training.TrainingDefense (not imported: training imports this module)
        seed: int,
        device: torch.device,
        coupled: bool,
        freeze: Iterable[str] = (),
    ) -> None:
        self.defense, self.coupled = defense, coupled
        self.private, self.frozen = private_copy(model, freeze)
        self.private.to(device).train()
        optimizer = optimizer_factory([p for p in self.private.parameters() if p.requires_grad])
        positions = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size,
                               generator=torch.Generator().manual_seed(seed))  # fmt: skip
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            self.engine = PrivacyEngine(accountant="prv", secure_mode=False)
            self.module, self.optimizer, self.loader = self.engine.make_private(
                module=self.private,
                optimizer=optimizer,
                data_loader=positions,
                noise_multiplier=defense.dp_noise_multiplier,
                max_grad_norm=defense.dp_max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
            )
        self.noise_only_steps = self.cut_batches = self.largest_batch = 0
        q = self.loader.sample_rate
        self.batch_cap = batch_cap(n, q, self.steps_per_epoch * epochs, defense.dp_delta) if coupled else None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def batches(self) -> Iterator[torch.Tensor]:
        for (positions,) in self.loader:
            self.largest_batch = max(self.largest_batch, len(positions))
            if self.batch_cap is not None and len(positions) > self.batch_cap:
                positions = positions[: self.batch_cap]
                self.cut_batches += 1
            yield positions

    def noise_step(self) -> None:
        """An optimizer step on a batch with no usable pair: zero clipped sum plus the noise (and accounted)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.noise_only_steps += 1

    def export(self, model: nn.Module) -> None:
        """Load the trained weights into `model`, the original architecture (strict)."""
        model.load_state_dict(original_state(self.private, model.state_dict()), strict=True)

    def facts(self) -> dict[str, Any]:
        """What the defense did: sampling, steps, epsilon at dp_delta (and the conservative bound if coupled)."""
        d = self.defense
        q = self.loader.sample_rate
        steps = sum(s for _, _, s in self.engine.accountant.history)
        out: dict[str, Any] = {
            "noise_multiplier": d.dp_noise_multiplier, "max_grad_norm": d.dp_max_grad_norm, "dp_delta": d.dp_delta,
            "sample_rate": q, "expected_batch_size": self.optimizer.expected_batch_size, "steps": steps,
            "noise_only_steps": self.noise_only_steps, "largest_batch": self.largest_batch,
            **reported_epsilon(d.dp_noise_multiplier, q, steps, d.dp_delta),
            "epsilon_covers": COVERAGE[self.coupled], "epsilon_is_guarantee": not self.coupled,
            "frozen_parameters": self.frozen,
        }  # fmt: skip
        if self.coupled:
            out.update(epsilon_conservative=conservative_epsilon(d.dp_noise_multiplier, q, steps, self.batch_cap,
                                                                 d.dp_delta),
                       batch_cap=self.batch_cap, cut_batches=self.cut_batches)  # fmt: skip
        return out
