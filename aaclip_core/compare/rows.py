"""Rows of a comparison: one per training run (a feedback run: one per loop), with the run's
attributes and the test results of the test runs made from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aaclip_core.checkpoints.checkpoint import FINAL, checkpoint_name, parse_checkpoint_name
from aaclip_core.compare.store import find_run
from aaclip_core.evaluation.protocol import METRIC_NAMES
from aaclip_core.prompts.names import PROMPT_PARAM
from aaclip_core.record import TRAINING_STAGES, Stage, Tag
from aaclip_core.training.schedule import loop_epochs

STAGE_ORDER = {s: i for i, s in enumerate(TRAINING_STAGES)}

# Recipe keys that do not change what a run learns or scores: ignored when grouping seeds.
_NON_CONFIG_KEYS = {
    "name", "description", "extends", "runtime.seed", "runtime.device", "runtime.threads",
    "data.num_workers", "data.cache_images", "tracking.experiment", "trainable_parameters",
    "val_images", "eval.batch_size",
}

@dataclass
class TestResult:
    run_id: str
    dataset: str
    checkpoint: str
    metrics: dict[str, float]  # mean over classes, raw [0, 1]
    root: str | None
    protocol: dict[str, str]  # eval.*, data.domain, model and fidelity settings the test ran with
    protocol_logged: bool  # False: taken from the training recipe (test run predates the params)
    n_images: int | None = None
    same_dataset: bool = False  # tested on the run's own training data (declared; `test` tags it)
    # class -> prompt name the test used; None: the test run predates logged names (aaclip's old table)
    prompt_names: dict[str, str] | None = None
    training_data: bool | None = None  # tested on the model's training data (None: not recorded)


@dataclass
class Row:
    key: str
    run_id: str
    stage: str
    label: str
    loop: int | None
    checkpoint: str
    selected: bool
    selection: str  # declared | held-out | test-set
    selection_detail: str
    attrs: dict[str, Any]
    tests: dict[str, TestResult] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)
    run_status: str = "FINISHED"
    config_key: str = ""

    @property
    def test_command(self) -> str:
        if self.loop is not None and self.checkpoint == checkpoint_name(self.loop, 2) and not self.selected:
            return f"aaclip test --run {self.run_id} --loop {self.loop}"
        if self.selected or self.checkpoint == FINAL:
            return f"aaclip test --run {self.run_id}"
        return f"aaclip test --run {self.run_id} --checkpoint {self.checkpoint}"

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "run_id": self.run_id,
            "stage": self.stage,
            "label": self.label,
            "loop": self.loop,
            "checkpoint": self.checkpoint,
            "selected": self.selected,
            "selection": self.selection,
            "selection_detail": self.selection_detail,
            "run_status": self.run_status,
            **{k: v for k, v in self.attrs.items() if not k.startswith("_")},
            "tested": bool(self.tests),
            "test": {d: asdict(t) for d, t in sorted(self.tests.items())},
            "held_out": dict(sorted(self.held_out.items())),
            "test_command": None if self.tests else self.test_command,
        }


def _test_result(test_run, train_params: dict[str, str]) -> TestResult:
    p = test_run.data.params
    protocol = {k[len("protocol."):]: v for k, v in p.items() if k.startswith("protocol.")}
    logged = bool(protocol)
    if not logged:
        protocol = {k: v for k, v in train_params.items() if k.startswith("eval.") or k == "data.domain"}
    return TestResult(
        run_id=test_run.info.run_id,
        dataset=test_run.data.tags.get(Tag.DATASET, "?"),
        checkpoint=test_run.data.tags.get(Tag.CHECKPOINT, FINAL),
        metrics={m: float(test_run.data.metrics[m]) for m in METRIC_NAMES if m in test_run.data.metrics},
        root=p.get("test.root"),
        protocol=protocol,
        protocol_logged=logged,
        same_dataset=test_run.data.tags.get(Tag.SAME_DATASET) == "true",
        prompt_names={k[len(PROMPT_PARAM):]: v for k, v in p.items() if k.startswith(PROMPT_PARAM)} or None,
        training_data=_bool_tag(test_run.data.tags.get(Tag.TRAINING_DATA,
                                                       test_run.data.tags.get(Tag.SAME_DATASET))),
    )


def _bool_tag(value: str | None) -> bool | None:
    return None if value is None else value == "true"


def _int(x) -> int | None:
    try:
        return int(str(x))
    except (TypeError, ValueError):
        return None


def _float(x) -> float | None:
    try:
        return float(str(x))
    except (TypeError, ValueError):
        return None


def _backbone(tags: dict, params: dict) -> tuple[str | None, str | None, int | None]:
    tag = tags.get(Tag.BACKBONE)
    if tag and ":" in tag and "@" in tag:
        name, rest = tag.split(":", 1)
        weights, size = rest.rsplit("@", 1)
        return name, weights, _int(size)
    pretrained = params.get("model.pretrained")
    if pretrained and "/" in pretrained:
        pretrained = Path(pretrained).name
    return params.get("model.name"), pretrained, _int(params.get("model.image_size"))


def _parent_loop(checkpoint: str | None) -> int | None:
    parsed = parse_checkpoint_name(checkpoint)
    return parsed[0] if parsed else None


def _loop_stage_2(checkpoint: str | None) -> int | None:
    """The loop of a feedback checkpoint taken after stage 2 (a loop's result), else None."""
    parsed = parse_checkpoint_name(checkpoint)
    return parsed[0] if parsed and parsed[1] == 2 else None


def run_epochs(client, run, loop: int | None, _seen: tuple = ()) -> tuple[int | None, str]:
    """Total training epochs behind a run's row (stage 1 + stage 2; feedback: summed over loops
    1..loop with :func:`loop_epochs`), including the run it started from, and how."""
    p, t = run.data.params, run.data.tags
    stage = t.get(Tag.STAGE)
    own, how = None, ""
    if stage in (Stage.BASE, Stage.CROSS):
        s1, s2 = _int(p.get("stage1.epochs")), _int(p.get("stage2.epochs"))
        if s1 is not None and s2 is not None:
            own, how = s1 + s2, f"{s1}+{s2}"
    elif stage == Stage.FEEDBACK:
        te, ie = _int(p.get("feedback.text_epochs_per_loop")), _int(p.get("feedback.image_epochs_per_loop"))
        decay, loops = _float(p.get("feedback.epochs_decay_rate")), _int(p.get("feedback.loops"))
        if None not in (te, ie, decay, loops):
            last = loop or loops
            per = [loop_epochs(te, decay, k) + loop_epochs(ie, decay, k) for k in range(1, last + 1)]
            own, how = sum(per), f"loops 1-{last}: " + "+".join(map(str, per))
    elif stage == Stage.IMPORTED:
        te, ie = _int(t.get(Tag.adapter_epoch("text_adapter"))), _int(t.get(Tag.adapter_epoch("image_adapter")))
        if te is not None or ie is not None:
            own, how = (te or 0) + (ie or 0), f"imported {te or 0}+{ie or 0}"
    parent = t.get(Tag.PARENT_RUN)
    if own is not None and parent and parent not in _seen:
        prun = find_run(client, parent)
        if prun is None:  # deleted from the store
            return own, how + f" (+ unknown from parent {parent[:8]}, not in the store)"
        pe, _ = run_epochs(client, prun, _parent_loop(t.get(Tag.PARENT_CHECKPOINT)),
                           (*_seen, run.info.run_id))
        if pe is not None:
            return own + pe, f"{how} + {pe} of parent {parent[:8]}"
    return own, how


def _attrs(client, run, loop: int | None) -> dict[str, Any]:
    t, p = run.data.tags, run.data.params
    name, weights, size = _backbone(t, p)
    epochs, how = run_epochs(client, run, loop)
    return {
        "fidelity": t.get(Tag.FIDELITY),
        "backbone": name,
        "weights": weights,
        "image_size": size,
        "quick_gelu": t.get(Tag.QUICK_GELU),
        "seed": _int(t.get(Tag.SEED)),
        "train_dataset": t.get(Tag.DATASET),
        "epochs": epochs,
        "epochs_detail": how,
        "trainable_parameters": _int(p.get("trainable_parameters")),
        "recipe": t.get(Tag.RECIPE),
    }


def _config_key(row_stage: str, loop: int | None, checkpoint: str, params: dict[str, str]) -> str:
    items = sorted((k, v) for k, v in params.items() if k not in _NON_CONFIG_KEYS and not k.startswith("import."))
    where = f"loop {loop}" if loop is not None else checkpoint
    return repr((row_stage, where, items))


def _val_history(client, run_id: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for m in METRIC_NAMES:
        for h in client.get_metric_history(run_id, f"val/{m}"):
            if not math.isnan(h.value):
                out.setdefault(int(h.step), {})[m] = float(h.value)
    return out


def rows_of(client, run, tests: dict[tuple[str, str], Any]) -> list[Row]:
    rid = run.info.run_id
    t, p = run.data.tags, run.data.params
    stage = t.get(Tag.STAGE, "?")
    selected_ckpt = t.get(Tag.SELECTED_CHECKPOINT, FINAL)
    by_ckpt: dict[str, dict[str, TestResult]] = {}
    for (dataset, ckpt), tr in tests.items():
        by_ckpt.setdefault(ckpt, {})[dataset] = _test_result(tr, p)
    short = rid[:8]
    rows: list[Row] = []

    def make(ckpt: str, loop: int | None, held: dict[str, float]) -> Row:
        selected = ckpt == selected_ckpt
        if stage == Stage.FEEDBACK:
            sel_loop = t.get(Tag.SELECTED_LOOP)
            if selected:
                selection, detail = "held-out", t.get(Tag.SELECTION, f"held-out selection: loop {sel_loop}")
            elif Tag.SELECTED_CHECKPOINT not in t:
                selection, detail = "declared", f"checkpoint '{ckpt}' (the run records no selection)"
            else:
                selection = "test-set"
                detail = (f"'{ckpt}' is not the held-out selected checkpoint '{selected_ckpt}': preferring it "
                          "can only rest on its test score (selection on the test set)")
        else:
            selection, detail = "declared", f"declared checkpoint '{ckpt}'"
        label = f"{stage} {short}"
        key = short
        if loop is not None and _loop_stage_2(ckpt) is not None:
            label += f" loop {loop}"
            key += f"/loop{loop}"
        elif ckpt != selected_ckpt:
            label += f" @{ckpt}"
            key += f"@{ckpt}"
        if selected and stage == Stage.FEEDBACK:
            label += " (selected)"
        row = Row(
            key=key, run_id=rid, stage=stage, label=label, loop=loop, checkpoint=ckpt, selected=selected,
            selection=selection, selection_detail=detail, attrs=_attrs(client, run, loop),
            tests=by_ckpt.get(ckpt, {}), held_out=held, run_status=run.info.status,
        )
        row.config_key = _config_key(stage, loop, ckpt if not selected else "selected", p)
        return row

    if stage == Stage.FEEDBACK:
        val = _val_history(client, rid)
        loops = set(val)
        loops |= {k for k in map(_loop_stage_2, by_ckpt) if k is not None}
        for k in sorted(loops):
            rows.append(make(checkpoint_name(k, 2), k, val.get(k, {})))
        if not loops:
            rows.append(make(selected_ckpt, _parent_loop(selected_ckpt), {}))
        for ckpt in sorted(by_ckpt):
            if _loop_stage_2(ckpt) is None:
                rows.append(make(ckpt, _parent_loop(ckpt), {}))
    else:
        rows.append(make(selected_ckpt, None, {}))
        for ckpt in sorted(c for c in by_ckpt if c != selected_ckpt):
            rows.append(make(ckpt, None, {}))
    return rows


