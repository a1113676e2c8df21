"""What `sharp` imports and prints that is not its own. bitsandbytes is imported by peft (and so by transformers'
Trainer) in every `sharp compress`, and on CPUs with AVX512-BF16 it logged a kernel notice although nothing is
quantized; this machine lacks the flag, so the subprocess makes bitsandbytes see it. And `sharp --help` imported
torch and transformers (seconds) before printing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Runs `sharp <args>` after making bitsandbytes see AVX512-BF16 (and no optional `kernels` package, as on most
# machines); writes whether the pretence took effect to the file named by SHARP_TEST_REPORT.
_PRETEND_AVX512_BF16 = """
import importlib.abc, importlib.machinery, json, os, sys

class PretendAvx512Bf16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True  # read at import by bitsandbytes.backends.cpu.ops
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, PretendAvx512Bf16())
sys.modules["kernels"] = None
sys.argv = ["sharp", *sys.argv[1:]]
try:
    from sharp.cli import main
    main()
finally:
    functional = sys.modules.get("bitsandbytes.functional")
    report = {"imported": functional is not None, "avx512_bf16": bool(functional and functional.has_avx512bf16())}
    with open(os.environ["SHARP_TEST_REPORT"], "w") as f:
        json.dump(report, f)
"""


def test_compress_prints_nothing_from_bitsandbytes(stories_path, tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": f"Tom had {n} red balls. He gave one to Sue. She was happy."}) + "\n"
                            for n in range(12)))
    args = ["compress", str(stories_path), "--strategy", "next:1-2", "--recovery", "lora:2", "--data", f"text:{data}",
            "--out", str(tmp_path / "out"), "--max-len", "32", "--batch-size", "4", "--slw-steps", "1",
            "--sft-steps", "1", "--eval-steps", "0", "--eval-fraction", "0.25"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "SHARP_TEST_REPORT": str(tmp_path / "report.json")}
    proc = subprocess.run([sys.executable, "-c", _PRETEND_AVX512_BF16, *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the pretence reached bitsandbytes, which peft imported: without the filter it logged its notice here
    assert json.loads((tmp_path / "report.json").read_text()) == {"imported": True, "avx512_bf16": True}
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if any(s in line for s in ("gemm_4bit", "kernels-community", "bitsandbytes"))]


_HELP = """
import json, os, sys
from sharp.cli import main
sys.argv = ["sharp", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(os.environ["HEAVY"].split(",")))))
"""
HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "lm_eval", "optimum", "gguf", "matplotlib", "datasets",
         "accelerate", "torch_pruning")


@pytest.mark.parametrize("args", [["--help"], ["compress", "--help"], ["eval", "--help"]])
def test_help_imports_no_heavy_library(args):
    """`import sharp` and the CLI's parsing load none of them (torch alone took seconds): each is imported by
    the code that uses it, so `sharp --help` or a mistyped option answers at once."""
    proc = subprocess.run([sys.executable, "-c", _HELP, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HEAVY": ",".join(HEAVY)})
    assert "Usage" in proc.stdout, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
