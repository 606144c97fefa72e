"""A hand-written single-edge intervention on the *HF model itself*, with forward hooks.

This is the independent oracle for the runtime (exactness contract item 3). It shares no code with
``graphs``: it finds the modules of each family by name, captures sender outputs with hooks on a
clean and a corrupted run, then reruns the clean prompts with one receiver's input shifted by
``a~_u - a_u``. Grouped-query models are first rewritten as the equivalent model with one key/value
head per query head, so that one head's key or value input can be changed alone.

Gemma's post-norms (docs/gemma.md): an MLP sender's output is what ``post_feedforward_layernorm``
returns; a head's is its share of what ``post_attention_layernorm`` returns,
``(1 + w) * (z_h @ W_O[h]) / rms(o_proj output)``, computed here from the HF modules' own
tensors in float32 (the share definition, written out independently of ``graphs.ops``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from graphs.ids import EdgeId, NodeKind


@dataclass
class Parts:
    embed: nn.Module
    attn_norms: list[nn.Module]
    mlp_norms: list[nn.Module]
    mlps: list[nn.Module]
    out_projs: list[nn.Module]
    qkv: list[dict[str, tuple[nn.Module, Callable[[int, int], slice]]]]  # slot -> (module, cols(head, dh))
    final_norm: nn.Module
    n_heads: int
    d_head: int
    conv1d_out: bool  # GPT-2 Conv1D (weight [in, out]) vs nn.Linear ([out, in])
    post_attn_norms: list[nn.Module] | None = None  # Gemma: norm of the summed attention output
    post_mlp_norms: list[nn.Module] | None = None  # Gemma: norm of the MLP output


def ungroup_kv(model: PreTrainedModel) -> PreTrainedModel:
    """The equivalent model with one key/value head per query head (exact for GQA/MQA)."""
    cfg = copy.deepcopy(model.config)
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if H_kv == H:
        return model
    group = H // H_kv
    cfg.num_key_value_heads = H
    with _no_init_weights():  # every parameter is loaded below; random init of a real model takes seconds
        wide = type(model)(cfg).to(model.dtype).eval()
    state = model.state_dict()
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    for key, value in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            shaped = value.view(H_kv, dh, *value.shape[1:])
            state[key] = shaped.repeat_interleave(group, dim=0).reshape(H * dh, *value.shape[1:])
    wide.load_state_dict(state)
    return wide


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def parts_of(model: PreTrainedModel) -> Parts:
    mt = model.config.model_type
    if mt == "gpt2":
        tr = model.transformer
        H = model.config.n_head
        d = model.config.n_embd
        dh = d // H
        qkv = [
            {s: (b.attn.c_attn, (lambda off: lambda h, dh: slice(off + h * dh, off + (h + 1) * dh))(i * d))
             for i, s in enumerate("qkv")}
            for b in tr.h
        ]
        return Parts(tr.wte, [b.ln_1 for b in tr.h], [b.ln_2 for b in tr.h], [b.mlp for b in tr.h],
                     [b.attn.c_proj for b in tr.h], qkv, tr.ln_f, H, dh, True)
    if mt in ("llama", "mistral", "qwen2"):
        base = model.model
        H = model.config.num_attention_heads
        dh = getattr(model.config, "head_dim", None) or model.config.hidden_size // H
        col = lambda h, dh: slice(h * dh, (h + 1) * dh)  # noqa: E731
        qkv = [{"q": (b.self_attn.q_proj, col), "k": (b.self_attn.k_proj, col), "v": (b.self_attn.v_proj, col)}
               for b in base.layers]
        return Parts(base.embed_tokens, [b.input_layernorm for b in base.layers],
                     [b.post_attention_layernorm for b in base.layers], [b.mlp for b in base.layers],
                     [b.self_attn.o_proj for b in base.layers], qkv, base.norm, H, dh, False)
    if mt == "gpt_neox":
        base = model.gpt_neox
        H = model.config.num_attention_heads
        dh = model.config.hidden_size // H
        qkv = [
            {s: (b.attention.query_key_value,
                 (lambda i: lambda h, dh: slice(h * 3 * dh + i * dh, h * 3 * dh + (i + 1) * dh))(i))
             for i, s in enumerate("qkv")}
            for b in base.layers
        ]
        return Parts(base.embed_in, [b.input_layernorm for b in base.layers],
                     [b.post_attention_layernorm for b in base.layers], [b.mlp for b in base.layers],
                     [b.attention.dense for b in base.layers], qkv, base.final_layer_norm, H, dh, False)
    if mt in ("gemma2", "gemma3_text"):
        base = model.model
        H = model.config.num_attention_heads
        dh = model.config.head_dim
        col = lambda h, dh: slice(h * dh, (h + 1) * dh)  # noqa: E731
        qkv = [{"q": (b.self_attn.q_proj, col), "k": (b.self_attn.k_proj, col), "v": (b.self_attn.v_proj, col)}
               for b in base.layers]
        return Parts(base.embed_tokens, [b.input_layernorm for b in base.layers],
                     [b.pre_feedforward_layernorm for b in base.layers], [b.mlp for b in base.layers],
                     [b.self_attn.o_proj for b in base.layers], qkv, base.norm, H, dh, False,
                     post_attn_norms=[b.post_attention_layernorm for b in base.layers],
                     post_mlp_norms=[b.post_feedforward_layernorm for b in base.layers])
    raise ValueError(f"no hook oracle for {mt}")


def _head_output(parts: Parts, layer: int, head: int, z: Tensor) -> Tensor:
    """z_h @ W_O[h] from the output projection's input z [B, T, H*dh]."""
    proj = parts.out_projs[layer]
    cols = slice(head * parts.d_head, (head + 1) * parts.d_head)
    w = proj.weight[cols, :] if parts.conv1d_out else proj.weight[:, cols].T  # [dh, d]
    return z[..., cols] @ w


def capture_sender(model: PreTrainedModel, parts: Parts, ids: Tensor, edge: EdgeId) -> Tensor:
    """The sender's output [B, T, d] on ``ids``, captured with a hook."""
    store: dict[str, Tensor] = {}
    node = edge.sender
    if node.kind is NodeKind.INPUT:
        handle = parts.embed.register_forward_hook(lambda m, a, out: store.__setitem__("x", out))
    elif node.kind is NodeKind.MLP:
        # with a post-MLP norm the sender is the normed output
        module = parts.mlps[node.layer] if parts.post_mlp_norms is None else parts.post_mlp_norms[node.layer]
        handle = module.register_forward_hook(lambda m, a, out: store.__setitem__("x", out))
    elif parts.post_attn_norms is None:
        def grab(m, args):
            store["x"] = _head_output(parts, node.layer, node.head, args[0])
        handle = parts.out_projs[node.layer].register_forward_pre_hook(grab)
    else:
        norm = parts.post_attn_norms[node.layer]

        def share(m, args, out):  # out: o_proj's output, the sum of every head of the layer in this run
            head = _head_output(parts, node.layer, node.head, args[0]).float()
            inv_rms = torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + norm.eps)
            store["x"] = (head * inv_rms * (1.0 + norm.weight.float())).to(out.dtype)
        handle = parts.out_projs[node.layer].register_forward_hook(share)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return store["x"].detach()


def single_edge_logits(
    model: PreTrainedModel, clean_ids: Tensor, corrupted_ids: Tensor, edge: EdgeId, position: int | None = None
) -> Tensor:
    """HF logits [B, T, V] on ``clean_ids`` with ``edge`` ablated to its corrupted-run value
    (at every token, or only at token ``position``: the positional edge ``u@t -> r@t``)."""
    model = ungroup_kv(model) if getattr(model.config, "num_key_value_heads", None) else model
    parts = parts_of(model)
    delta = capture_sender(model, parts, corrupted_ids, edge) - capture_sender(model, parts, clean_ids, edge)
    if position is not None:  # the receiver at other tokens reads its clean input
        keep = torch.zeros(delta.shape[1], dtype=delta.dtype)
        keep[position] = 1
        delta = delta * keep[None, :, None]
    rec = edge.receiver.node
    handles = []
    if rec.kind is NodeKind.LOGITS:
        handles.append(parts.final_norm.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    elif rec.kind is NodeKind.MLP:
        handles.append(parts.mlp_norms[rec.layer].register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        seen: dict[str, Tensor] = {}
        norm = parts.attn_norms[rec.layer]
        proj, cols_of = parts.qkv[rec.layer][edge.receiver.slot.value]
        cols = cols_of(rec.head, parts.d_head)

        def remember(m, args):
            seen.setdefault("x", args[0])

        def replace(m, args, out):
            h = m(norm(seen["x"] + delta))  # re-enters hooks: remember() keeps the first x
            out = out.clone()
            out[..., cols] = h[..., cols]
            return out

        handles.append(norm.register_forward_pre_hook(remember))
        handles.append(proj.register_forward_hook(_guard(replace)))
    try:
        with torch.no_grad():
            return model(clean_ids).logits
    finally:
        for h in handles:
            h.remove()


def _guard(fn: Callable) -> Callable:
    """Wrap a forward hook so that calls made from inside it are not intercepted again."""
    active = {"on": False}

    def hook(m, args, out):
        if active["on"]:
            return out
        active["on"] = True
        try:
            return fn(m, args, out)
        finally:
            active["on"] = False

    return hook
