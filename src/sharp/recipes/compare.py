"""`compare()`: SHARP against pruning baselines at the same stored size and the same fine-tuning budget.

load → Original → Direct Sharing (sets the budget S = its stored parameters, recovery included) → for each
baseline: prune to S (`sharp.baselines.prune`), evaluate, heal with the same SFT as compress, evaluate →
SHARP without SFT (`compress(stages="slw")`) → SHARP (`compress(stages="slw,sft", train="full-lora")`) →
optional native smaller model → `comparison.md` + `comparison.json`, written atomically.

Every finished row is cached in `OUT.work/rows.json`, so rerunning the same call after a crash skips it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sharp.errors import SharpError
from sharp.recipes.config import RUNTIME_ONLY, SETTINGS_BEFORE_THEIR_FLAG, CompressConfig, RecoverySettings

ROW_NAMES = {"layer-drop": "LayerPruning (layer-drop)", "layer-drop-adapted": "LayerPruning-adapted",
             "mlp-drop": "MLP-drop", "width": "Width pruning (Taylor)"}


@dataclass(kw_only=True)
class CompareConfig(RecoverySettings):
    """Settings of `sharp compare`; the `RecoverySettings` ones are passed unchanged to `compress` and to the
    healing of every baseline."""

    eval: str  # perplexity tasks, as `sharp eval --tasks`
    reference_model: str | None = None
    methods: str = "layer-drop,layer-drop-adapted,mlp-drop,width"
    heal: bool = True
    allocation: str = "even"
    calib_samples: int = 32
    eval_max_len: int = 512
    eval_batch_size: int = 8
    eval_limit: int | None = None
    tolerance: float = 0.01  # largest allowed spread of the compressed rows' stored parameters
    train: str = "full-lora"  # what SHARP's SFT trains (as compress --train)
    match_trainable: bool = False  # heal each baseline with the LoRA rank whose trainable count is nearest SHARP's
    planned: bool = False  # add a row `--strategy auto:BUDGET` (the planner) at SHARP's stored size
    only: str = ""  # build only these row keys (e.g. "sharp-plan"); the others come from the cache or are left out

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def compress_config(self, name: str, stages: str, strategy: str | None = None) -> CompressConfig:
        shared = {f.name: getattr(self, f.name) for f in fields(RecoverySettings)}
        if strategy:
            shared["strategy"] = strategy
        return CompressConfig(**{**shared, "out": str(self.work_dir / name), "overwrite": True}, stages=stages,
                              train=self.train)

    def sft(self) -> dict:
        return self.compress_config("sharp", "slw,sft").sft_config(progress=False).__dict__

    def validate(self) -> None:
        """Everything checkable without weights (compress's own checks included)."""
        from sharp.baselines.methods import ALLOCATIONS, METHODS
        from sharp.data import check_chat_template
        from sharp.evaluation.perplexity import parse_tasks
        from sharp.io.atomic import check_output_dir
        from sharp.io.models import check_max_len, load_config, load_tokenizer, resolve_model_path

        check_output_dir(self.out, self.overwrite)
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown:
            raise SharpError(f"unknown method '{unknown[0]}' in --methods; choose from: {', '.join(METHODS)}")
        keys = ["original", "direct", *(k for m in METHODS for k in (m, f"{m}+heal")), "sharp-slw", "sharp",
                "sharp-plan", "reference"]
        strange = [k.strip() for k in self.only.split(",") if k.strip() and k.strip() not in keys]
        if strange:
            raise SharpError(f"unknown row '{strange[0]}' in --only; choose from: {', '.join(keys)}")
        if self.allocation not in ALLOCATIONS:
            raise SharpError(f"unknown --allocation '{self.allocation}'; choose one of: {', '.join(ALLOCATIONS)}")
        if self.calib_samples < 1 or not 0 < self.tolerance < 1:
            raise SharpError("--calib-samples must be >= 1 and --tolerance in (0, 1)")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise SharpError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        tasks = parse_tasks(self.eval)
        if self.reference_model:
            resolve_model_path(self.reference_model)
        self.compress_config("sharp", "slw,sft").validate()
        check_chat_template(self.template, [task.spec for task in tasks], lambda: load_tokenizer(self.model))
        check_max_len(load_config(self.model), self.eval_max_len, "--eval-max-len")


def compare(cfg: CompareConfig, progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build and evaluate every row; write `comparison.md` / `comparison.json` to `cfg.out`."""
    import sharp
    from sharp.baselines import prune, spread
    from sharp.baselines.heal import heal
    from sharp.baselines.table import Row, compressed_spread, to_json, to_markdown
    from sharp.data import pad_id, split_tokenized
    from sharp.evaluation.perplexity import evaluate_tasks, parse_tasks
    from sharp.io.atomic import atomic_dir, write_text_atomic
    from sharp.io.device import load_on_device
    from sharp.recipes.compress import compress

    cfg.validate()
    tasks = parse_tasks(cfg.eval)
    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "rows.json"
    cache = _read_cache(cache_path)
    rows: list[Row] = []
    only = {k.strip() for k in cfg.only.split(",") if k.strip()}

    def evaluate(model) -> dict[str, dict[str, float]]:
        return evaluate_tasks(model, tokenizer, tasks, max_len=cfg.eval_max_len, batch_size=cfg.eval_batch_size,
                              limit=cfg.eval_limit, template=cfg.template, progress=progress)

    def row(key: str, name: str, build: Callable[[], tuple[object, dict]], compressed: bool = True) -> None:
        settings = _row_settings(cfg, key)
        cached = cache.get(key, {}).get("settings")
        if cached is not None and _depends_on({**SETTINGS_BEFORE_THEIR_FLAG, **cached}, key) == settings:
            # older files may hold more settings, or lack one that had a fixed value then
            rows.append(Row(**cache[key]["row"]))
            log(f"{name}: cached")
            return
        if only and key not in only:  # another process builds it (rows pooled in one cache afterwards)
            log(f"{name}: left out (--only)")
            return
        start = time.perf_counter()
        model, details = build()
        seconds = time.perf_counter() - start  # building and training; evaluation is the same for every row
        res = evaluate(model)
        training = details.get("heal") or details.get("compress", {}).get("sft") or {}
        r = Row(key, name, sharp.count_parameters(model)["stored"], {t: v["ppl"] for t, v in res.items()},
                compressed, healed=key.endswith("+heal"), seconds=seconds, details=details,
                nll_sem={t: v["nll_sem"] for t, v in res.items()}, examples={t: v["examples"] for t, v in res.items()},
                trainable=training.get("trainable", 0), train_tokens=training.get("train_tokens", 0))
        rows.append(r)
        cache[key] = {"settings": settings, "row": asdict(r)}
        write_text_atomic(cache_path, json.dumps({"version": 2, "rows": cache}, indent=2, sort_keys=True, default=str))
        log(f"{name}: {r.stored:,} stored, " + ", ".join(f"{k} {v:.2f}" for k, v in r.ppl.items())
            + f" ({r.seconds:.0f} s)")

    original, tokenizer, _ = load_on_device(cfg.model, cfg.device, cfg.dtype)
    pad = pad_id(tokenizer)
    train, held = split_tokenized(cfg.data, tokenizer, cfg.max_len, cfg.template, cfg.eval_fraction, cfg.seed)
    calib = train[: cfg.calib_samples]
    row("original", "Original", lambda: (original, {}), compressed=False)

    direct = sharp.share(copy.deepcopy(original), cfg.strategy, cfg.recovery, source=cfg.model)
    budget = sharp.count_parameters(direct)["stored"]  # SHARP's stored size: every compressed row matches it
    sharp_trainable = _sharp_trainable(direct, cfg)
    row("direct", "Direct Sharing", lambda model=direct: (model, {}))
    del direct

    for method in cfg.method_list:
        pruned: dict = {}

        def build(method=method, pruned=pruned):
            model = copy.deepcopy(original)
            report = prune(model, method, str(budget), calib, cfg.strategy, cfg.allocation)
            off = spread({"sharp": budget, method: report.params_stored})
            if off > cfg.tolerance:
                raise SharpError(f"{method} reaches {report.params_stored:,} stored parameters, {off:.2%} from "
                                 f"SHARP's {budget:,}; budgets must match within {cfg.tolerance:.0%}")
            pruned.update(model=model, layers=report.base_layers())
            return model, report.to_dict()

        def build_healed(method=method, pruned=pruned):
            if "model" not in pruned:
                build()
            model, layers = pruned.pop("model"), pruned.pop("layers")
            rank = lora_rank_for(model, sharp_trainable) if cfg.match_trainable else cfg.full_lora_rank
            summary = heal(model, train, held, _sft(cfg), rank, pad_id=pad, seed=cfg.seed,
                           teacher=original if cfg.loss != "ce" else None, teacher_layers=layers)
            return model, {"heal": summary}

        row(method, ROW_NAMES[method], build)
        if cfg.heal:
            row(f"{method}+heal", ROW_NAMES[method] + " + heal", build_healed)

    sharp_rows = [("sharp-slw", "SHARP without SFT (SLW only)", "slw", None), ("sharp", "SHARP", "slw,sft", None)]
    if cfg.planned:
        sharp_rows.append(("sharp-plan", "SHARP planned (auto)", "slw,sft", f"auto:{budget}"))
    for key, name, stages, strategy in sharp_rows:
        def build_sharp(key=key, stages=stages, strategy=strategy):
            summary = compress(cfg.compress_config(key, stages, strategy), progress=progress)
            model, _, _ = load_on_device(str(cfg.work_dir / key), cfg.device, cfg.dtype)
            keep = ("perplexity", "timing", "params", "slw", "sft", "plan", "strategy")
            return model, {"compress": {k: summary.get(k) for k in keep}}

        row(key, name, build_sharp)
    if cfg.reference_model:
        row("reference", f"Native smaller model ({cfg.reference_model})",
            lambda: (load_on_device(cfg.reference_model, cfg.device, cfg.dtype)[0], {}), compressed=False)

    names = [t.name for t in tasks]
    header = {"model": cfg.model, "strategy": cfg.strategy, "recovery": cfg.recovery, "data": cfg.data,
              "budget (stored parameters)": f"{budget:,}",
              "fine-tuning (SHARP SFT and every heal)": f"{cfg.sft_steps} steps × batch {cfg.batch_size} × "
              f"{cfg.grad_accum} accum, lr {cfg.lr}, loss {cfg.loss}"
              + (f" + {cfg.kd_hidden:g} × hidden states" if cfg.kd_hidden else "")
              + f"; SHARP trains {cfg.train}; baselines heal "
              + (f"with the LoRA rank whose trainable count is nearest SHARP's ({sharp_trainable:,})"
                 if cfg.match_trainable else f"with LoRA r={cfg.full_lora_rank}") + " on the remaining linears",
              **({"planned row": "--strategy auto:BUDGET at SHARP's stored size (it may store fewer, never more), "
                  f"actions {cfg.plan_actions}, shared MLPs ≥ {cfg.plan_min_shared:.0%} of the removal, "
                  f"references up to {cfg.plan_reach} layer(s) back, cost {cfg.plan_cost}"}
                 if cfg.planned else {}),
              "SLW": f"{cfg.slw_steps} steps per target on {cfg.slw_fraction:.0%} of the training examples, init "
              f"{cfg.slw_init}, inputs {cfg.slw_inputs}"}
    with atomic_dir(cfg.out, cfg.overwrite) as tmp:
        (tmp / "comparison.md").write_text(to_markdown(rows, names, header))
        (tmp / "comparison.json").write_text(to_json(rows, names, header))
    # the planner removes at least the budget's parameters in whole layers' steps, so its row may store fewer
    # (a handicap, never an advantage): it is held to "not more" instead of to the spread
    matched = [r for r in rows if r.key != "sharp-plan"]
    result = {"rows": [asdict(r) for r in rows], "spread": compressed_spread(matched), "budget": budget}
    planned = next((r for r in rows if r.key == "sharp-plan"), None)
    if planned and planned.stored > budget * (1 + cfg.tolerance):
        raise SharpError(f"the planned row stores {planned.stored:,} parameters, more than SHARP's {budget:,}")
    log(f"stored-parameter spread of the compressed rows: {result['spread']:.3%}")
    if result["spread"] > cfg.tolerance:
        raise SharpError(f"compressed rows differ by {result['spread']:.2%} in stored parameters (> "
                         f"{cfg.tolerance:.0%}); see {Path(cfg.out) / 'comparison.md'}")
    return result


# settings no row's numbers depend on: compress's runtime-only ones, where the run writes and the choice of rows
# (so rows built by separate processes, each with its own --out, can be pooled in one cache)
_NOT_ROW_SETTINGS = RUNTIME_ONLY + ("out", "methods", "heal", "reference_model", "tolerance", "planned", "only")
_SLW_SETTINGS = tuple(f.name for f in fields(RecoverySettings) if f.name.startswith(("slw_", "plan_")))
_PLAN_SETTINGS = tuple(f.name for f in fields(RecoverySettings) if f.name.startswith("plan_"))
_BASELINE_SETTINGS = ("allocation", "calib_samples")
_SFT_SETTINGS = ("sft_steps", "loss", "kd_temperature", "kd_hidden", "lr", "shared_lr", "grad_accum", "full_lora_rank",
                 "train", "match_trainable")  # what only training rows (SHARP's SFT, a heal) depend on


def _row_settings(cfg: CompareConfig, key: str) -> dict:
    return _depends_on(asdict(cfg), key)


def _depends_on(settings: dict, key: str) -> dict:
    """The settings row `key` depends on: SLW settings only matter to SHARP rows, the planner's only to the planned
    row, calibration only to baselines, SFT settings only to rows that train, so changing the SLW budget reruns
    the SHARP rows alone and changing the SFT loss leaves the untrained rows cached."""
    skip = _NOT_ROW_SETTINGS + (_BASELINE_SETTINGS if key.startswith("sharp") else _SLW_SETTINGS)
    if key != "sharp-plan":
        skip += _PLAN_SETTINGS
    if not (key in ("sharp", "sharp-plan") or key.endswith("+heal")):  # rows that do not train
        skip += _SFT_SETTINGS
    return {k: v for k, v in settings.items() if k not in skip}


def _read_cache(path: Path) -> dict:
    """{row key: {"settings", "row"}} from `rows.json` (version 1 files: one settings dict for all rows)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") == 2:
        return data["rows"]
    old = data.get("settings", {})
    return {key: {"settings": _row_settings(CompareConfig(**old), key), "row": row}
            for key, row in data.get("rows", {}).items()}


def _sharp_trainable(direct, cfg: CompareConfig) -> int:
    """What SHARP's SFT will train (counted on a copy of the Direct-Sharing model, before any training)."""
    from sharp.recovery.trainable import add_full_lora, mark_trainable

    model = copy.deepcopy(direct)
    if cfg.train.startswith("full-lora"):
        add_full_lora(model, rank=cfg.full_lora_rank)
    return mark_trainable(model, cfg.train)["trainable"]


def lora_rank_for(model, trainable: int) -> int:
    """The healing LoRA rank whose trainable count (every remaining linear) is nearest `trainable`."""
    from sharp.baselines.heal import lora_parameters_per_rank

    return max(1, round(trainable / lora_parameters_per_rank(model)))


def _sft(cfg: CompareConfig):
    from sharp.recovery.sft import SFTConfig

    return SFTConfig(**{**cfg.sft(), "progress": False})
