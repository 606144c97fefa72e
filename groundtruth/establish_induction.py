"""Establish the ground-truth circuit of ``groundtruth/models/induction-2l`` and print the evidence.

Three independent kinds of evidence (their numbers are in groundtruth/README.md):

1. Attention patterns on held-out training-distribution sequences: each head's mean attention
   to the previous position (previous-token score) and, at induced positions, to the token after
   the previous occurrence of the current token (induction score).
2. Head ablations: held-out accuracy at induced positions with a head's output mean-ablated
   (every outgoing edge carries the head's mean output over the held-out tokens), alone and in groups.
3. Exact edge patching on the induction task (logit difference, corrupted ablation): every edge's
   effect as a percentage of the full effect ``m(full) - m(empty)``. The ground truth is the set of
   edges whose |effect| is at least ``THRESHOLD_PERCENT`` of it; it is confirmed by the faithfulness of
   that circuit (every other edge ablated) and of its complement.

    python -m groundtruth.establish_induction
"""

from __future__ import annotations

import torch
from torch import Tensor

from circuits.evaluate import faithfulness, reference_metrics
from circuits.methods.patching import edge_patching
from graphs import runtime as rt
from graphs.adapters.spec import ModelSpec
from graphs.circuit import Circuit
from graphs.ids import parse_node
from graphs.scores import EdgeScores
from groundtruth.induction_data import N_CTX, training_batch

THRESHOLD_PERCENT = 0.6  # ground truth: |edge-patching effect| >= 0.6 % of m(full) - m(empty)
HELD_OUT_SEED = 777


def held_out(n: int = 512) -> tuple[Tensor, Tensor]:
    """Held-out sequences [n, 40] and their induced positions [n, 40] (seed not used in training)."""
    return training_batch(n, torch.Generator().manual_seed(HELD_OUT_SEED))


@torch.no_grad()
def attention_scores(spec: ModelSpec, ids: Tensor, induced: Tensor) -> dict[str, tuple[float, float]]:
    """Per head: (mean attention to t-1 over t >= 1, mean attention at induced positions to the
    position after the previous occurrence of the current token)."""
    patterns: dict[int, Tensor] = {}
    rt.run(spec, ids, observe=lambda layer, name, t: patterns.__setitem__(layer, t) if name == "pattern" else None)
    T = ids.shape[1]
    pos = torch.arange(T)
    earlier_same = (ids[:, :, None] == ids[:, None, :]) & (pos[None, None, :] < pos[None, :, None])  # [B, T, T]
    after_prev = torch.zeros_like(earlier_same)
    after_prev[:, :, 1:] = earlier_same[:, :, :-1]  # key j is right after an earlier copy of the query token
    out = {}
    for layer, p in patterns.items():  # p: [B, H, T, T]
        for h in range(p.shape[1]):
            prev = float(p[:, h, pos[1:], pos[1:] - 1].mean())
            ind = float((p[:, h] * after_prev).sum(-1)[induced].mean())
            out[f"a{layer}.h{h}"] = (prev, ind)
    return out


@torch.no_grad()
def ablated_accuracy(spec: ModelSpec, ids: Tensor, induced: Tensor, heads: list[str]) -> float:
    """Accuracy at induced positions with ``heads`` mean-ablated (their every outgoing edge)."""
    g = spec.graph
    mask = torch.zeros(g.n_senders, g.n_receivers)
    for h in heads:
        s = g.sender_index(parse_node(h))
        mask[s] = g.edge_mask[s].float()
    values = rt.mean_values(spec, ids)
    logits = rt.run(spec, ids, mask=mask if heads else None, ablation=values if heads else None).logits
    hit = (logits[:, :-1].argmax(-1) == ids[:, 1:]) & induced[:, :-1]
    return float(hit.sum() / induced[:, :-1].sum())


def ground_truth_edges(scores: EdgeScores, span: float, threshold_percent: float = THRESHOLD_PERCENT) -> list[str]:
    """Edges whose |edge-patching effect| is at least ``threshold_percent`` of ``span``."""
    return [str(e) for e, s in scores.items() if abs(s) >= threshold_percent / 100 * abs(span)]


def main() -> None:
    from groundtruth.known import INDUCTION

    torch.set_num_threads(1)
    experiment = INDUCTION.experiment()
    spec = experiment.spec
    ids, induced = held_out()
    assert ids.shape[1] == N_CTX

    print("== attention patterns (held-out sequences)")
    for head, (prev, ind) in attention_scores(spec, ids, induced).items():
        print(f"{head}: previous-token {prev:.3f}  induction {ind:.3f}")

    print("\n== held-out accuracy at induced positions with heads mean-ablated")
    H = spec.n_heads
    groups: list[list[str]] = [[]]
    groups += [[f"a{l}.h{h}"] for l in range(spec.n_layers) for h in range(H)]
    groups += [[f"a0.h{h}" for h in range(1, H)], [f"a1.h{h}" for h in range(H)]]
    for heads in groups:
        print(f"{', '.join(heads) or '(none)':32s} {ablated_accuracy(spec, ids, induced, heads):.3f}")

    print(f"\n== exact edge patching on the task ({experiment.n_prompts} prompts, logit difference)")
    base = reference_metrics(experiment)
    scores = edge_patching(experiment)
    print(f"m(full) {base.m_full:.3f}  m(empty) {base.m_empty:.3f}")
    for edge, s in sorted(scores.items(), key=lambda kv: -abs(kv[1]))[:30]:
        print(f"{edge!s:22s} {s:8.4f}  {100 * abs(s) / base.span:6.2f} %")
    truth = ground_truth_edges(scores, base.span)
    print(f"\nedges with |effect| >= {THRESHOLD_PERCENT} %: {len(truth)}")
    print(", ".join(truth))
    print("matches groundtruth.known:", sorted(truth) == sorted(INDUCTION.edges))
    circuit = Circuit.from_edges(spec.graph, truth)
    complement = Circuit(spec.graph, spec.graph.edge_mask & ~circuit.in_circuit)
    print(f"faithfulness of the ground truth {faithfulness(experiment, circuit, base).value:.4f}")
    print(f"faithfulness of its complement   {faithfulness(experiment, complement, base).value:.4f}")


if __name__ == "__main__":
    main()
