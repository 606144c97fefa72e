"""Data-parallel discovery: two gloo ranks under torchrun give the scores of one process.

One ``torchrun --standalone --nproc_per_node 2`` job runs ``_worker`` below: every rank scores its
shard with EAP, EAP-IG, AtP*, edge patching, EAP under mean ablation, the path-patching search and
ACDC, rank 0 saves the results, and then both ranks run ``circuits discover --distributed`` (the
same process group). The test process computes everything again in one process and compares.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from circuits import distributed as dp
from circuits.experiment import Experiment
from circuits.methods.acdc import acdc
from circuits.methods.cdt import cdt_edge_scores
from circuits.methods.eap import atp_star, eap, eap_ig
from circuits.methods.patching import edge_patching
from circuits.methods.path_search import path_patching_search
from graphs.adapters import build_spec
from graphs.io import load_circuit
from tests.conftest import make_tiny, random_task

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


# ----------------------------------------------------------------------------- sharding
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(1, 9), st.integers(1, 17))
def test_shards_are_contiguous_whole_batches_that_cover_every_prompt(n: int, world: int, batch: int) -> None:
    n_batches = -(-n // batch)
    if n_batches < world:
        with pytest.raises(dp.DistributedError, match="fewer than"):
            dp.shard_rows(n, 0, world, batch)
        return
    shards = [dp.shard_rows(n, r, world, batch) for r in range(world)]
    assert shards[0].start == 0 and shards[-1].stop == n
    for a, b in itertools.pairwise(shards):
        assert a.stop == b.start
    for s in shards:
        assert s.start % batch == 0 and s.n_prompts >= 1 and s.total_prompts == n
    sizes = [-(-s.n_prompts // batch) for s in shards]  # batches per rank
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n_batches


def test_single_process_reduction_is_the_identity() -> None:
    exp = Experiment(build_spec(make_tiny("gpt2-mini")), random_task(4, 5), "logit_diff", batch_size=2)
    red = dp.reducer(exp)
    t = torch.arange(3.0)
    assert not red.active and red.sum(t) is t and red.count(4) == 4 and red.broadcast_state(None) is None
    assert dp.shard_experiment(exp, dp.SINGLE) is exp
    scores = eap(exp)
    assert dp.all_reduce_scores(scores, 4, 4) is scores
    with pytest.raises(dp.DistributedError):
        dp.all_reduce_scores(scores, 2, 4)


def test_init_without_torchrun_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(dp.DistributedError, match="torchrun"):
        dp.init_from_env()


# ----------------------------------------------------------------------------- the methods
def _main_experiment(ablation: str = "corrupted") -> Experiment:
    # 10 prompts in batches of 3: 4 batches, dealt out 2 + 2 (rows 0-5 and 6-9): uneven shards
    return Experiment(build_spec(make_tiny("gpt2")), random_task(10, 7, seed=3), "logit_diff", ablation=ablation,
                      batch_size=3)


def _acdc_experiment() -> Experiment:
    return Experiment(build_spec(make_tiny("gpt2-mini")), random_task(6, 6, seed=5), "kl", batch_size=2)


def method_results(world: dp.World) -> dict[str, torch.Tensor]:
    """Every method's scores on the shard of ``world`` (the whole dataset for a single process)."""
    exp = dp.shard_experiment(_main_experiment(), world)
    mean = dp.shard_experiment(_main_experiment("mean"), world)
    small = dp.shard_experiment(_acdc_experiment(), world)
    out = {
        "eap": eap(exp).values,
        "eap-ig": eap_ig(exp, steps=2).values,
        "atp*": atp_star(exp).values,
        "edge-patching": edge_patching(exp, max_rows=64).values,
        "eap-mean": eap(mean).values,
        "path-search": path_patching_search(small, k=1, max_nodes=3).scores.values,
        "cdt": cdt_edge_scores(exp).values,
        "cdt-exact": cdt_edge_scores(exp, "exact").values,
    }
    result = acdc(small, tau=0.01)
    out["acdc-scores"] = result.scores.values
    out["acdc-circuit"] = result.circuit.in_circuit.to(torch.uint8)
    return out


WORKER = """
import sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from circuits import distributed as dp
from tests.test_distributed import method_results

world = dp.init_from_env()
assert world.size == 2, world
results = method_results(world)
if world.is_root:
    save_file({{k: v.contiguous() for k, v in results.items()}}, {out!r})
from cli.main import cli
# without --distributed every rank runs the whole job: each needs its own run directory, or one
# rank finds the other's progress files there and refuses to start
args = {cli_args!r}
if not world.is_root:
    args[args.index("--out") + 1] += f"-rank{{world.rank}}"
try:
    cli(args=args, prog_name="circuits")
except SystemExit as e:
    if e.code:
        raise
dp.shutdown()
"""


def _cli_args(model_dir: Path, out: Path) -> list[str]:
    return ["discover", "--model", str(model_dir), "--method", "eap", "--edges", "12", "--n-prompts", "8",
            "--batch-size", "2", "--no-curve", "--no-svg", "--out", str(out), "--json"]


@pytest.mark.timeout(600)
def test_two_gloo_ranks_equal_one_process(tmp_path: Path, tiny_dir: Path) -> None:
    saved = tmp_path / "rank0.safetensors"
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(saved), cli_args=_cli_args(tiny_dir, out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False,
    )
    assert job.returncode == 0, job.stderr[-4000:] + job.stdout[-2000:]

    distributed = load_file(str(saved))
    single = method_results(dp.SINGLE)
    for name, expected in single.items():
        got = distributed[name].to(expected.dtype)
        if name == "acdc-circuit":
            assert torch.equal(got, expected), name
            continue
        scale = float(expected.abs().max())
        assert scale > 0, name
        err = float((got - expected).abs().max())
        print(f"{name}: max |distributed - single| / max |single| = {err / scale:.2e}")
        assert err <= RTOL * scale, (name, err / scale)

    # the CLI: rank 0 wrote the files; the same run in one process gives the same circuit and scores
    summary, _ = json.JSONDecoder().raw_decode(job.stdout[job.stdout.index("{"):])
    assert summary["method"] == "eap" and summary["edges"] <= 12
    from circuits.pipeline import DiscoverySettings, discover

    result = discover(DiscoverySettings(model=str(tiny_dir), method="eap", edges=12, target_faithfulness=None,
                                        n_prompts=8, batch_size=2, curve=False))
    assert result is not None
    written = load_circuit(out / "circuit.json")
    assert torch.equal(written.in_circuit, result.circuit.in_circuit)
    assert torch.allclose(written.scores.values, result.scores.values, rtol=RTOL, atol=RTOL * float(result.scores.values.abs().max()))
    assert written.provenance["n_prompts"] == 8 and written.provenance["settings"]["n_prompts"] == 8
    assert not (out / "progress").exists()  # a finished run leaves no progress behind
