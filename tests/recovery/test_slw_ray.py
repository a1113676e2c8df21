"""SLW on Ray (`SLWConfig(backend="ray")`): a local Ray instance with 2 CPUs trains the same recovery as the
local backend, and a task whose worker dies is retried by Ray and resumes from the layer's saved state.

Tolerance: none. Each layer's job runs the same float32 operations with one thread whichever process runs it,
so the tensors are bitwise equal.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sharp.recovery import slw
from sharp.recovery.activations import ActivationStore
from sharp.recovery.capture import capture_activations
from sharp.recovery.slw import train_slw
from sharp.recovery.slw_layer import train_layer
from tests.recovery.test_slw import MODEL, TARGETS, _originals, _recovery_tensors, shared_copy, tiny_config

ray = pytest.importorskip("ray", reason="optional extra ray is not installed (pip install 'sharp-llm[ray]')")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # starting Ray and two worker pools: ~2 min on 2 busy cores


@pytest.fixture(scope="module")
def original():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def store(original, tmp_path_factory) -> ActivationStore:
    ids = torch.randint(3, 512, (4, 96), generator=torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("capture") / "activations"
    return capture_activations(original, [{"input_ids": ids}], TARGETS, root, max_tokens=2048, dtype="float32",
                               progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance with 2 CPUs; its workers import `sharp` and this test module from the checkout."""
    here = Path(__file__).parent  # pytest imports this file as a top-level module: `crash_once` lives there
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), str(here), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ray_backend_matches_local_backend(original, store, tmp_path, local_ray):
    local, on_ray = shared_copy(original), shared_copy(original)
    kw = dict(progress=False, originals=_originals(original))
    r_local = train_slw(local, store, tiny_config(workers=2), tmp_path / "local", **kw)
    r_ray = train_slw(on_ray, store, tiny_config(workers=2, backend="ray"), tmp_path / "ray", **kw)
    assert sorted(r_ray) == TARGETS
    for t in TARGETS:
        assert r_ray[t]["rel_err_after"] == r_local[t]["rel_err_after"] < r_local[t]["rel_err_before"]
    _assert_same(_recovery_tensors(local), _recovery_tensors(on_ray))


def crash_once(job, threads, report):
    """The first attempt at a layer trains 15 steps (state saved at step 10), then its worker process dies."""
    marker = Path(job.layer_dir).parent / f"crashed_{job.layer}"
    if not marker.exists():
        marker.touch()
        job.stop_after = 15
        train_layer(job, threads, report)
        os._exit(1)
    return train_layer(job, threads, report)


def test_ray_retries_a_dead_worker_from_the_layer_state(original, store, tmp_path, local_ray, monkeypatch):
    straight = shared_copy(original)
    train_slw(straight, store, tiny_config(), tmp_path / "straight", progress=False, originals=_originals(original))
    monkeypatch.setattr(slw, "train_layer", crash_once)
    retried = shared_copy(original)
    work = tmp_path / "retried"
    out = train_slw(retried, store, tiny_config(workers=2, backend="ray"), work, progress=False,
                    originals=_originals(original))
    assert all((work / f"crashed_{t}").exists() for t in TARGETS)  # every task died once
    log = (work / "slw_log.jsonl").read_text()
    assert log.count('"event": "resume"') == len(TARGETS)  # ...and its retry resumed from step 10
    assert sorted(out) == TARGETS
    _assert_same(_recovery_tensors(straight), _recovery_tensors(retried))
