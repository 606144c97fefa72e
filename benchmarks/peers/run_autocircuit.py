"""Child process: auto-circuit's EAP or ACDC on a model folder and a peers data file (peers venv).

    <user cache>/causal-circuits/peers/venv/bin/python benchmarks/peers/run_autocircuit.py --folder DIR \
        --data data.safetensors --out scores.safetensors --method eap --batch 8

Runs in the peers' virtual environment and imports nothing from the project except the score file
helper (torch + safetensors only). Steps:

1. Build a ``HookedTransformer`` from the local HF folder without touching the hub
   (``get_pretrained_model_config`` / ``get_pretrained_state_dict`` on the folder, then
   ``load_and_process_state_dict`` with every weight rewrite off, so the model computes exactly what
   the HF model computes). The rotary base is read from config.json: the folders are written by
   transformers 5, which nests it in ``rope_parameters``, and the venv's transformers 4.57 (and so
   TransformerLens) would silently fall back to 10000. The largest |logit difference| to the venv's
   HF model and to last-position logits computed by the project's own transformers (``--reference``)
   are reported.
2. Wrap it with ``patchable_model(factorized=True, slice_output="last_seq", separate_qkv=True)``.
3. Time only the scoring call: EAP is ``mask_gradient_prune_scores(grad_function="logit",
   answer_function="avg_diff", mask_val=0.0)`` (equal to its edge attribution patching); ACDC is
   ``acdc_prune_scores`` at one threshold with the KL target (auto-circuit's ACDC uses the first batch
   of the loader only).
   For ACDC the order in which it will visit the edges is recorded (``visit_order`` in the score
   file's metadata): within a layer it is the order of a Python set and changes between processes.
4. Map auto-circuit's names to ours (``Resid Start`` -> ``input``, ``A3.1`` -> ``a3.h1``, ``MLP 2``
   -> ``m2``, ``A3.1.Q`` -> ``a3.h1<q>``, ``Resid End`` -> ``logits``) and write the score file.

auto-circuit's EAP score is the gradient of its *loss* ``-mean logit difference`` summed over the
batches (``loss.backward()`` per batch accumulates into the mask gradient); the comparison aligns the
sign and scale and reports the fitted factor.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# benchmarks.common is stdlib only: importable from the peers venv
from benchmarks.common import peak_rss_mb
from benchmarks.peers.scorefile import write_scores

_HEAD = re.compile(r"^A(\d+)\.(\d+)$")
_HEAD_SLOT = re.compile(r"^A(\d+)\.(\d+)\.([QKV])$")
_MLP = re.compile(r"^MLP (\d+)$")


def our_sender(name: str) -> str:
    """auto-circuit source node name -> our sender id."""
    if name == "Resid Start":
        return "input"
    if m := _HEAD.match(name):
        return f"a{m[1]}.h{m[2]}"
    if m := _MLP.match(name):
        return f"m{m[1]}"
    raise ValueError(f"unexpected auto-circuit source node {name!r}")


def our_receiver(name: str) -> str:
    """auto-circuit destination node name -> our receiver id."""
    if name == "Resid End":
        return "logits"
    if m := _HEAD_SLOT.match(name):
        return f"a{m[1]}.h{m[2]}<{m[3].lower()}>"
    if m := _MLP.match(name):
        return f"m{m[1]}"
    raise ValueError(f"unexpected auto-circuit destination node {name!r}")


def rope_theta_of(folder: Path) -> float | None:
    """The rotary base written in the folder's config.json (transformers 5 nests it in
    ``rope_parameters``, which transformers 4.57 ignores, falling back to 10000)."""
    raw = json.loads((folder / "config.json").read_text())
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta"))
    return None if theta is None else float(theta)


def load_hooked_transformer(folder: Path, check_ids: torch.Tensor) -> tuple[Any, torch.Tensor, float]:
    """A HookedTransformer with the weights of the HF folder, its logits on ``check_ids`` and their
    largest difference to the HF model's (both in this venv's transformers)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(folder)
    theta = rope_theta_of(folder)
    if theta is not None:
        hf_config.rope_theta = theta
    hf = AutoModelForCausalLM.from_pretrained(folder, config=hf_config, dtype=torch.float32).eval()
    cfg = get_pretrained_model_config(str(folder), fold_ln=False, device="cpu", dtype=torch.float32)
    cfg.use_attn_result = True  # per-head outputs (source nodes)
    cfg.use_split_qkv_input = True  # separate q / k / v inputs (destination nodes)
    cfg.use_hook_mlp_in = True  # MLP input before its norm
    n_kv = getattr(hf.config, "num_key_value_heads", None)
    if n_kv is not None and n_kv != cfg.n_heads:
        cfg.ungroup_grouped_query_attention = True
    if theta is not None:
        cfg.rotary_base = theta
    # No tokenizer: inputs are token ids, and the folders' tokenizer_config.json may name a class of
    # a newer transformers than the one in the peers venv.
    cfg.tokenizer_name = None
    state = get_pretrained_state_dict(str(folder), cfg, hf)
    model = HookedTransformer(cfg, None)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    model.eval()
    with torch.no_grad():
        logits = model(check_ids)
        diff = float((logits - hf(check_ids).logits).abs().max())
    del hf, state
    gc.collect()
    return model, logits[:, -1], diff


class SampledSearch:
    """Times the forward passes of an ACDC search restricted to a sample of edges, per start layer."""

    def __init__(self, model: Any, edges_per_layer: dict[int, int], sampled_per_layer: dict[int, int]) -> None:
        self.edges_per_layer = edges_per_layer
        self.sampled_per_layer = sampled_per_layer
        self.forward_seconds: dict[int, list[float]] = {layer: [] for layer in edges_per_layer}
        self.forward_cpu_seconds: dict[int, list[float]] = {layer: [] for layer in edges_per_layer}
        inner = model.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            begin, cpu_begin = time.perf_counter(), time.process_time()
            out = inner(*args, **kwargs)
            if "start_at_layer" in kwargs:  # the per-edge trials; the clean runs before them pass no layer
                layer = int(kwargs["start_at_layer"])
                self.forward_seconds[layer].append(time.perf_counter() - begin)
                self.forward_cpu_seconds[layer].append(time.process_time() - cpu_begin)
            return out

        model.forward = timed  # this child process only; the model is discarded with it

    def estimate(self, call_seconds: float, call_cpu_seconds: float) -> dict[str, Any]:
        """The sampled call's time plus, for every edge not visited, the mean trial forward of its layer
        (wall and CPU seconds).

        The unvisited edges' mask updates and KL are not counted, and nothing else differs per edge.
        On ``gpt2-random`` (20 edges per layer) it came to 142.8 CPU s against 137.0 measured for the
        whole search: within 5 %, a little high."""
        missing = [layer for layer, t in self.forward_seconds.items() if not t]
        if missing:
            raise SystemExit(f"no trial forward was timed for start layers {missing}")

        def rest(per_layer: dict[int, list[float]]) -> tuple[float, dict[str, float]]:
            mean = {layer: sum(t) / len(t) for layer, t in sorted(per_layer.items())}
            unvisited = sum(mean[layer] * (n - self.sampled_per_layer[layer]) for layer, n in self.edges_per_layer.items())
            return unvisited, {str(k): v for k, v in mean.items()}

        wall, wall_means = rest(self.forward_seconds)
        cpu, cpu_means = rest(self.forward_cpu_seconds)
        return {"sampled_edges": sum(self.sampled_per_layer.values()), "total_edges": sum(self.edges_per_layer.values()),
                "sampled_call_seconds": call_seconds, "sampled_call_cpu_seconds": call_cpu_seconds,
                "estimated_seconds": call_seconds + wall, "estimated_cpu_seconds": call_cpu_seconds + cpu,
                "mean_trial_forward_seconds_per_start_layer": wall_means,
                "mean_trial_forward_cpu_seconds_per_start_layer": cpu_means,
                "edges_per_start_layer": {str(k): v for k, v in sorted(self.edges_per_layer.items())}}


def sample_edges(model: Any, per_layer: int) -> SampledSearch:
    """Restrict ``model.edges`` to ``per_layer`` evenly spaced edges per start layer (the block a trial
    starts from, as acdc_prune_scores computes it); every mask stays full size, so each trial forward
    costs what it costs in the whole search."""
    by_layer: dict[int, list[Any]] = {}
    for edge in sorted(model.edges, key=lambda e: e.name):
        by_layer.setdefault(int(edge.dest.module_name.split(".")[1]), []).append(edge)
    keep: set[Any] = set()
    for edges in by_layer.values():
        step = max(len(edges) // per_layer, 1)
        keep.update(edges[::step][:per_layer])
    sampled = {layer: len([e for e in edges if e in keep]) for layer, edges in by_layer.items()}
    search = SampledSearch(model, {layer: len(edges) for layer, edges in by_layer.items()}, sampled)
    model.edges = keep
    return search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", choices=("eap", "acdc"), default="eap")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument("--reference", type=Path, help="last-position logits of the project's HF model (check)")
    p.add_argument("--sample-per-layer", type=int, default=0,
                   help="ACDC: visit only this many edges per start layer and estimate the whole search's time")
    args = p.parse_args()

    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.utils.graph_utils import patchable_model
    from safetensors.torch import load_file

    d = load_file(str(args.data))
    N = d["clean"].shape[0]
    if N % args.batch:
        raise SystemExit(f"{N} prompts do not split into batches of {args.batch} (auto-circuit drops the rest)")
    tl_model, tl_last, tl_diff = load_hooked_transformer(args.folder, d["clean"][: min(N, 2)])
    ref_diff = None
    if args.reference is not None:  # against the project's transformers, which reads the config itself
        ref = load_file(str(args.reference))["logits"]
        ref_diff = float((tl_last[: len(ref)] - ref).abs().max())
    model = patchable_model(tl_model, factorized=True, slice_output="last_seq", separate_qkv=True,
                            device=torch.device("cpu"))
    dataset = PromptDataset(d["clean"], d["corrupted"], list(d["answers"]), list(d["wrongs"]))
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=args.batch, shuffle=False)
    before = peak_rss_mb()
    extra: dict[str, Any] = {}
    meta = {"side": "auto-circuit", "method": args.method}
    if args.method == "acdc":
        # The order acdc_prune_scores visits the edges in: by receiver layer, within a layer that of
        # the set model.edges, which changes between processes (hash(None) is an address before
        # Python 3.12); the same set object in this process gives the same order as inside the call.
        meta["visit_order"] = "\n".join(
            f"{our_sender(e.src.name)}->{our_receiver(e.dest.name)}"
            for e in sorted(model.edges, key=lambda x: x.dest.layer, reverse=True)
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.method == "eap":
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

        prune_scores = mask_gradient_prune_scores(
            model, loader, None, grad_function="logit", answer_function="avg_diff", mask_val=0.0
        )
    else:
        from auto_circuit.prune_algos.ACDC import acdc_prune_scores

        exp = math.floor(math.log10(args.tau))
        base = args.tau / 10**exp
        sampled = sample_edges(model, args.sample_per_layer) if args.sample_per_layer else None
        start, cpu_start = time.perf_counter(), time.process_time()
        prune_scores = acdc_prune_scores(model, loader, None, tao_exps=[exp], tao_bases=[base],  # type: ignore[list-item]
                                         faithfulness_target="kl_div")
        extra = {"tau_used": base * 10**exp, "prompts_used": args.batch}
        if sampled is not None:
            extra["sampled"] = sampled.estimate(time.perf_counter() - start, time.process_time() - cpu_start)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if args.method == "acdc" and args.sample_per_layer:  # a partial search: only its time means anything
        print(json.dumps({"side": "auto-circuit", "method": "acdc-sampled", "seconds": extra["sampled"]["estimated_seconds"],
                          "cpu_seconds": extra["sampled"]["estimated_cpu_seconds"],
                          "peak_rss_mb": peak_rss_mb(), "rss_before_call_mb": before, "edges": None, "kept": None,
                          "threads": torch.get_num_threads(), "tl_vs_hf_max_abs_logit_diff": tl_diff,
                          "tl_vs_project_hf_max_abs_logit_diff": ref_diff, **extra}))
        return
    scores: dict[str, float] = {}
    kept: set[str] | None = set() if args.method == "acdc" else None
    for edge in model.edges:
        ours = f"{our_sender(edge.src.name)}->{our_receiver(edge.dest.name)}"
        value = float(edge.prune_score(prune_scores))
        if kept is not None and math.isinf(value):  # ACDC: never removed = in the circuit
            kept.add(ours)
            value = 0.0
        scores[ours] = value
    write_scores(args.out, scores, meta, kept)
    print(json.dumps({"side": "auto-circuit", "method": args.method, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_rss_mb": peak_rss_mb(),
                      "rss_before_call_mb": before, "edges": len(scores), "kept": None if kept is None else len(kept),
                      "tl_vs_hf_max_abs_logit_diff": tl_diff,
                      "tl_vs_project_hf_max_abs_logit_diff": ref_diff, "threads": torch.get_num_threads(), **extra}))


if __name__ == "__main__":
    main()
