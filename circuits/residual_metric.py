"""The task metrics straight from the final residual, without materialising the logits.

ACDC scores thousands of trials of a few rows each. Unembedding them into [rows, V] logits and then
normalising those costs more than the rest of a trial, though every built-in metric needs only

* the logits at the answer and wrong-answer ids (``logit_diff``, ``prob_diff``, ``logprob``),
* the log-sum-exp ``lse(z)`` of the logits over the vocabulary (``prob_diff``, ``logprob``, ``kl``),
* for ``kl``, ``sum_v p_v z_v`` with ``p`` the reference distribution, as

      -KL(p || softmax z) = sum_v p_v (z_v - lse(z)) - sum_v p_v log p_v.

The log-sum-exp (and, with logit soft-capping, ``sum_v p_v z_v``) is accumulated over vocabulary
chunks small enough that the chunk of the unembedding and its logits stay in cache. Values equal
``circuits.metrics`` on the full logits up to float rounding (tests/test_residual_metric.py). No
gradients; other metrics have no scorer (``ResidualScorer.for_batch`` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import Tensor

from circuits.experiment import PreparedBatch
from graphs import ops
from graphs.adapters.spec import ModelSpec

SUPPORTED = frozenset({"logit_diff", "prob_diff", "logprob", "kl"})
STREAMED = frozenset({"prob_diff", "logprob", "kl"})  # the metrics that need the log-sum-exp over the vocabulary
CHUNK_BYTES = 2**22  # one vocabulary chunk of the unembedding (fastest at 2-4 MiB on this CPU, docs/scale.md)


@dataclass(frozen=True)
class ResidualScorer:
    """One batch's metric [K, P] of final residuals [K, P, d] (before the final norm)."""

    spec: ModelSpec
    metric: str
    answers: Tensor | None  # [P, Ka] ids, -1 padding
    wrongs: Tensor | None  # [P, Kw]
    reference: Tensor | None  # [P, V] reference probabilities (kl)
    reference_term: Tensor | None  # [P] float64: sum_v p_v log p_v over the support (kl)
    projected: Tensor | None  # [P, d] float64: sum_v p_v W_U[v] (kl without soft-capping)
    reference_bias: Tensor | None  # [P] float64: sum_v p_v b_U[v]
    unembedding: Tensor | None  # [d, V] W_U transposed, contiguous, in ``wide`` (None for logit_diff)
    wide: torch.dtype  # the dtype of the arithmetic: the model's, at least float32 (like circuits.metrics)
    blas: ThreadpoolController  # numpy's BLAS, held to torch's thread count during products

    @staticmethod
    @torch.no_grad()
    def for_batch(spec: ModelSpec, batch: PreparedBatch, unembedding: Tensor | None = None) -> ResidualScorer | None:
        """The scorer of ``batch``, or None for metrics it cannot compute. ``unembedding``: the
        ``[d, V]`` contiguous transpose of ``W_U``, to share one copy between batches."""
        name = batch.metric.name
        if name not in SUPPORTED or (name == "kl" and batch.reference is None):
            return None
        wide = torch.promote_types(spec.dtype, torch.float32)
        answers = batch.answers.long() if batch.metric.uses_answers else None
        wrongs = batch.wrongs.long() if batch.metric.uses_wrongs else None
        W_T = None
        if name in STREAMED:
            W_T = transposed_unembedding(spec) if unembedding is None else unembedding  # [d, V]
        blas = ThreadpoolController()
        if name != "kl":
            return ResidualScorer(spec, name, answers, wrongs, None, None, None, None, W_T, wide, blas)
        assert batch.reference is not None
        ref_lp = F.log_softmax(batch.reference.to(wide), dim=-1)  # [P, V] (a no-op on log-probs)
        p = ref_lp.exp()
        support = p > 0
        term = torch.where(support, p.double() * torch.where(support, ref_lp, 0.0).double(), 0.0).sum(-1)
        projected = bias = None
        if spec.final_softcap is None:  # sum_v p_v z_v is linear in the normed residual
            projected = _chunked_sum(p, spec.W_U)  # [P, d]
            bias = None if spec.b_U is None else p.double() @ spec.b_U.double()
        return ResidualScorer(spec, name, None, None, p, term, projected, bias, W_T, wide, blas)

    @torch.no_grad()
    def __call__(self, final: Tensor) -> Tensor:
        x = ops.apply_norm(self.spec.final_norm, final).to(self.wide)  # [K, P, d]
        if self.metric == "logit_diff":
            assert self.answers is not None and self.wrongs is not None
            return _set_mean(self._logits_at(x, self.answers)) - _set_mean(self._logits_at(x, self.wrongs))
        lse, pz = self._stream(x)  # [K, P] float64
        if self.metric == "kl":
            assert self.reference is not None and self.reference_term is not None
            if pz is None:
                assert self.projected is not None
                pz = (x.double() * self.projected).sum(-1)
                if self.reference_bias is not None:
                    pz = pz + self.reference_bias
            total = self.reference.double().sum(-1)  # [P] (1 up to rounding)
            return (pz - lse * total - self.reference_term).to(self.wide)
        assert self.answers is not None
        answers = self._logits_at(x, self.answers)
        if self.metric == "logprob":
            z, valid = answers
            return (torch.logsumexp(torch.where(valid, z.double(), -torch.inf), dim=-1) - lse).to(self.wide)
        assert self.wrongs is not None  # prob_diff
        return (_prob_sum(answers, lse) - _prob_sum(self._logits_at(x, self.wrongs), lse)).to(self.wide)

    def _logits_at(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits at ids [K, P, n], valid [P, n]) of normed residuals x [K, P, d]."""
        valid = ids >= 0
        index = ids.clamp(min=0)
        z = torch.einsum("kpd,pnd->kpn", x, self.spec.W_U[index].to(self.wide))  # [K, P, n]
        if self.spec.b_U is not None:
            z = z + self.spec.b_U[index].to(self.wide)
        return _softcap(z, self.spec.final_softcap), valid

    def _stream(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(lse [K, P], sum_v p_v z_v [K, P] or None) over vocabulary chunks, in float64."""
        K, P, d = x.shape
        flat = x.reshape(K * P, d)
        W, b = self.unembedding, self.spec.b_U  # [d, V]
        assert W is not None
        b = None if b is None else b.to(self.wide)
        V = W.shape[1]
        step = max(16, CHUNK_BYTES // (W.element_size() * d))
        with_p = self.metric == "kl" and self.projected is None
        maxima, sums = [], []
        pz = torch.zeros(K, P, dtype=torch.float64, device=x.device) if with_p else None
        with self.blas.select(user_api="blas").limit(limits=torch.get_num_threads()):  # numpy follows torch's threads
            for lo in range(0, V, step):
                z = _product(flat, W[:, lo : lo + step])  # [K*P, c]
                if b is not None:
                    z += b[lo : lo + z.shape[1]]
                z = _softcap(z, self.spec.final_softcap)
                if pz is not None:
                    assert self.reference is not None
                    pz += (z.reshape(K, P, -1) * self.reference[:, lo : lo + z.shape[1]]).sum(-1).double()
                top = z.amax(dim=1, keepdim=True)  # [K*P, 1]
                maxima.append(top)
                sums.append(z.sub_(top).exp_().sum(dim=1, keepdim=True))
        M = torch.cat(maxima, dim=1).double()  # [K*P, chunks]
        S = torch.cat(sums, dim=1).double()
        top = M.amax(dim=1, keepdim=True)
        lse = top[:, 0] + (S * (M - top).exp()).sum(dim=1).log()
        return lse.view(K, P), pz


def _product(x: Tensor, W: Tensor) -> Tensor:
    """x [N, d] @ W [d, c] (a column chunk of the unembedding's transpose).

    On CPU in float32 / float64 the product runs in numpy's BLAS (OpenBLAS in numpy's wheels),
    which on this machine takes 15-45 % less time than torch's MKL for these shapes (tens of rows
    by 256 by 4,096 columns; a whole ACDC search on ``gpt2-random`` 13 % less, docs/scale.md). The
    caller holds numpy's BLAS to torch's thread count; the values are the same to float rounding."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and W.dtype == x.dtype:
        return torch.from_numpy(np.matmul(x.detach().contiguous().numpy(), W.detach().numpy()))
    return torch.mm(x, W)


def transposed_unembedding(spec: ModelSpec) -> Tensor:
    """``W_U^T`` [d, V], contiguous, at least float32: what the streamed metrics multiply by."""
    return spec.W_U.T.to(torch.promote_types(spec.dtype, torch.float32)).contiguous()


def _softcap(z: Tensor, cap: float | None) -> Tensor:
    return z if cap is None else torch.tanh(z / cap) * cap


def _chunked_sum(p: Tensor, W: Tensor) -> Tensor:
    """p [P, V] @ W [V, d] in float64, a vocabulary chunk at a time (no float64 copy of W)."""
    step = max(16, CHUNK_BYTES // (W.element_size() * W.shape[1]))
    out = torch.zeros(p.shape[0], W.shape[1], dtype=torch.float64, device=W.device)
    for lo in range(0, W.shape[0], step):
        out += p[:, lo : lo + step].double() @ W[lo : lo + step].double()
    return out


def _set_mean(at: tuple[Tensor, Tensor]) -> Tensor:
    z, valid = at
    return torch.where(valid, z, 0.0).sum(-1) / valid.sum(-1)


def _prob_sum(at: tuple[Tensor, Tensor], lse: Tensor) -> Tensor:
    z, valid = at
    return torch.where(valid, (z.double() - lse[..., None]).exp(), 0.0).sum(-1)
