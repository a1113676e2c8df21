"""`compress()`: pretrained model → recovered SHARP checkpoint. load → share → SLW → SFT → eval → save.

Work files (captured activations, SLW layer states, Trainer checkpoints, cached perplexities, the log) live in
`OUT.work/`; the output folder appears, atomically, only when everything is done, and the work folder is then
removed. Rerunning the same call after a crash resumes from the stage it was in.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from transformers import set_seed

import sharp
from sharp.arch import num_layers
from sharp.data import collate_examples, pad_id, split_tokenized
from sharp.evaluation.perplexity import response_perplexity
from sharp.io.atomic import append_json_line, atomic_dir, write_text_atomic
from sharp.io.device import place, resolve_device
from sharp.io.dtypes import cast_to, dtype_name, resolve_dtype, round_to
from sharp.io.lock import output_lock
from sharp.io.manifest import write_manifest
from sharp.io.models import load_tokenizer, resolve_model_path, source_dtype
from sharp.recipes import distributed as dist
from sharp.recipes.config import CompressConfig, StageMeter, prepare_work_dir, run_identity
from sharp.recovery.lazy import SafetensorsWeights
from sharp.recovery.planner import plan_strategy
from sharp.recovery.sft import run_sft
from sharp.recovery.slw import run_slw
from sharp.recovery.trainable import add_full_lora, mark_trainable, merge_full_lora
from sharp.sharing.build import base_identity
from sharp.sharing.recovery import parse_recovery
from sharp.sharing.state import sharp_config
from sharp.sharing.strategy import parse_strategy

SLW_KEYS = ("rel_err_before", "rel_err_init", "rel_err_after", "sink_rel_err_before", "sink_rel_err_after",
            "train_tokens", "eval_tokens", "sink_tokens", "step", "params", "init", "seconds")


def compress(cfg: CompressConfig, progress: bool = True) -> dict:
    """Run the stages of `cfg` and write the checkpoint to `cfg.out`. Returns the summary (also saved)."""
    dist.barrier()  # under torchrun every rank looks at the same folders before rank 0 changes them
    finished = _finished(cfg, clean=dist.is_main())
    dist.barrier()
    if finished is not None:
        return finished
    cfg.validate()
    if not dist.is_main():  # rank 0 holds the lock and writes the work folder; see `distributed.py`
        dist.barrier()
        return _compress(cfg, cfg.work_dir, progress=False)
    with output_lock(cfg.work_dir):
        work = prepare_work_dir(cfg)
        dist.barrier()
        return _compress(cfg, work, progress)


def _plan(cfg: CompressConfig, model, batches, path: Path, meter: StageMeter, progress: bool = False) -> dict:
    """The planner's choice for `auto:BUDGET` (cached in the work folder, so a resumed run shares the same;
    under torchrun rank 0 plans and the other ranks read its file)."""
    if not dist.is_main():
        dist.wait_until(path.is_file, "rank 0's plan")
    if path.is_file():
        return json.loads(path.read_text())
    budget = parse_strategy(cfg.strategy).budget
    with meter("plan"):
        text, plan, costs = plan_strategy(model, batches, parse_recovery(cfg.recovery), budget,
                                          [a.strip() for a in cfg.plan_actions.split(",")], cfg.plan_min_shared,
                                          max_tokens=cfg.slw_tokens, reach=cfg.plan_reach,
                                          cost=cfg.plan_cost, progress=progress)
    result = {"strategy": text, "budget": budget, **plan.to_dict(), "costs": [asdict(c) for c in costs]}
    write_text_atomic(path, json.dumps(result, indent=2, sort_keys=True))
    return result


def _finished(cfg: CompressConfig, clean: bool = True) -> dict | None:
    """The summary of this very run when a kill caught it after publishing `out` but before removing its work
    folder: the rerun then only finishes the clean-up (instead of refusing the non-empty `out`)."""
    from sharp.io.manifest import verify_manifest
    out, work = Path(cfg.out), cfg.work_dir
    if not (work.exists() and (out / "summary.json").is_file()):
        return None
    try:
        summary = json.loads((out / "summary.json").read_text())
        same = run_identity(summary["config"]) == run_identity(asdict(cfg))
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return None
    if not same or verify_manifest(out):
        return None
    if not clean:
        return summary
    with output_lock(work):
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _original(cfg: CompressConfig, model, kd: bool, slw: bool):
    """What SLW captures from and KD's teacher: the original model. SLW alone (rank 0) takes the model's folder
    when it is plain safetensors, read one layer at a time (no second copy in memory) and rounded to the storage
    dtype as the loaded copy is, so SLW's fit does not depend on --loss; KD needs it loaded."""
    if kd:
        return copy.deepcopy(model)
    if not (slw and dist.is_main()):
        return None
    source = resolve_model_path(cfg.model)
    return source if SafetensorsWeights.available(source) else copy.deepcopy(model)


def _compress(cfg: CompressConfig, work: Path, progress: bool) -> dict:
    log_path = work / "train_log.jsonl"
    meter = StageMeter(work / "stages.json", write=dist.is_main())
    evals_path = work / "evals.json"
    evals: dict = json.loads(evals_path.read_text()) if evals_path.is_file() else {}

    # 1. load the model and the data
    with meter("load"):
        tokenizer = load_tokenizer(cfg.model)  # tokenize first: data that cannot train fails before the weights load
        pad = pad_id(tokenizer)
        train, held = split_tokenized(cfg.data, tokenizer, cfg.max_len, cfg.template, cfg.eval_fraction, cfg.seed,
                                      cfg.eval_data)
        if not held:
            raise sharp.SharpError("no held-out examples to score; raise --eval-fraction or pass --eval-data")
        # the weights in their storage dtype (bf16 for a bf16 or GGUF source), then on the device in the compute
        # dtype (fp32 on a CPU): every stage then sees exactly the base weights the checkpoint stores
        device = resolve_device(cfg.device)
        storage = resolve_dtype(cfg.dtype, source_dtype(resolve_model_path(cfg.model)))
        model, _ = sharp.load_model(cfg.model, dtype=storage)
        identity = base_identity(model, cfg.model)  # hashed as stored, so an adapter-only save checks on the base
        place(model, device, storage)

    collate = functools.partial(collate_examples, pad_id=pad)

    def perplexity(name: str) -> None:
        if name not in evals:
            start = time.perf_counter()
            with meter("eval", accumulate=True):
                evals[name] = response_perplexity(model, held, cfg.batch_size, progress=progress)["ppl"]
            seconds = time.perf_counter() - start
            if dist.is_main():
                write_text_atomic(evals_path, json.dumps(evals, indent=2))
                append_json_line(log_path, {"stage": "eval", "model": name, "ppl": evals[name], "seconds": seconds})

    perplexity("original")

    # 2. share: targets drop their MLP weights and reuse their reference's, plus untrained recovery (a planned
    # strategy, auto:BUDGET, is chosen first from closed-form costs on the SLW sample)
    stages = cfg.stage_list
    kd = "sft" in stages and cfg.loss != "ce"
    original = _original(cfg, model, kd, slw="slw" in stages and not meter.done("slw"))
    n = max(1, round(len(train) * cfg.slw_fraction))
    sample = [train[i] for i in sorted(random.Random(cfg.seed).sample(range(len(train)), n))]
    batches = [collate(sample[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]
    strategy, plan = cfg.strategy, None
    if parse_strategy(strategy).kind == "auto":
        plan = _plan(cfg, model, batches, work / "plan.json", meter, progress)
        strategy = plan["strategy"]
    set_seed(cfg.seed)
    sharp.share(model, strategy, cfg.recovery, source=cfg.model)
    sharp_config(model).base = identity
    counts = sharp.count_parameters(model)
    layer_map = sharp_config(model).base_layers(num_layers(model.config))  # this model's layer -> the original's
    perplexity("direct")

    # 3. SLW: fit each target's recovery to its original MLP on captured activations
    slw_summary, sft_summary = {}, {}
    if "slw" in stages:
        with meter("slw"):
            if not dist.is_main():  # rank 0 trains the layers; the others load its results
                dist.wait_until(lambda: StageMeter(work / "stages.json").done("slw"), "rank 0's SLW stage")
                batches = []
            layers = run_slw(original, model, batches, cfg.slw_config(), work / "slw", progress=progress,
                             layer_map=layer_map, original_dtype=storage)
        round_to(model, storage)  # the fit is float32; score what the checkpoint will store
        if not kd:
            original = None  # only the KD teacher needs the original model after SLW
        if dist.is_main() and not meter.logged("slw"):
            for layer, res in layers.items():
                row = {k: v for k, v in res.items() if k != "curve"}
                append_json_line(log_path, {"stage": "slw", "layer": layer, **row})
            meter.mark_logged("slw")
        slw_summary = {str(t): {k: r.get(k) for k in SLW_KEYS} for t, r in layers.items()}
        perplexity("slw")

    # 4. SFT: end-to-end next-token loss on the responses, only the recovery (or + LoRA everywhere) trainable
    if "sft" in stages:
        if cfg.train.startswith("full-lora"):
            set_seed(cfg.seed)
            add_full_lora(model, rank=cfg.full_lora_rank)
        mark_trainable(model, cfg.train)
        with meter("sft"):
            sft_summary = run_sft(model, train, held if cfg.eval_steps else [], cfg.sft_config(progress),
                                  work / "sft", collate, log_file=log_path if dist.is_main() else None,
                                  teacher=original if kd else None,
                                  teacher_layers=layer_map)
        if cfg.train.startswith("full-lora"):
            merge_full_lora(model)
        model.requires_grad_(False)
        round_to(model, storage)
        perplexity("sft")

    del original
    # 5. summary and save (atomic: the folder appears complete or not at all)
    summary = {
        "model": cfg.model, "strategy": strategy, "recovery": cfg.recovery, "data": cfg.data, "plan": plan,
        "stages": stages, "train": cfg.train, "params": counts,
        "mlp_reduction": 1 - counts["mlp_stored"] / counts["mlp_original"],
        "perplexity": evals, "eval_examples": len(held), "train_examples": len(train),
        "slw": slw_summary, "sft": {k: sft_summary.get(k) for k in ("steps", "train_tokens", "trainable", "eval_loss")},
        "timing": meter.stages, "config": asdict(cfg), "dtype": dtype_name(storage), "device": str(device),
    }
    if not dist.is_main():
        return summary
    start = time.perf_counter()
    with atomic_dir(cfg.out, cfg.overwrite) as tmp:
        sharp.save(cast_to(model, storage), tmp, tokenizer=tokenizer, overwrite=True)
        summary["timing"]["save"] = {"seconds": time.perf_counter() - start, "peak_rss_mib": None}
        shutil.copy(log_path, tmp / "train_log.jsonl")  # exists: the first evaluation logged to it
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        write_manifest(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return summary
