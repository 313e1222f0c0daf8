"""Whether a row may be compared with the reference row on a test dataset, and every attribute that
differs between the compared rows (the rules are in the package docstring)."""

from __future__ import annotations

from typing import Any

from aaclip_core.compare.rows import Row, TestResult
from aaclip_core.prompts.names import PromptNamer

# Protocol settings whose difference does not change a reported number (batch independence is a
# design rule, SPEC §6; aupro only switches AUPRO on or off).
_PROTOCOL_NEUTRAL = {"eval.batch_size", "eval.aupro"}


_UNFAIR_FIELDS = (
    ("fidelity", "fidelity"),
    ("backbone", "backbone"),
    ("weights", "backbone weights"),
    ("image_size", "image size"),
    ("quick_gelu", "QuickGELU"),
)
_NOTE_FIELDS = (
    ("seed", "seed"),
    ("epochs", "total epochs"),
    ("trainable_parameters", "trainable parameters"),
    ("train_dataset", "training dataset"),
)


# A test's own model settings against its training run's: (protocol key, row attribute, name).
_TRAINED_AS = (
    ("fidelity", "fidelity", "fidelity"),
    ("model.image_size", "image_size", "image size"),
    ("model.quick_gelu", "quick_gelu", "QuickGELU"),
    ("model.name", "backbone", "backbone"),
)


def _protocol_diff(a: dict[str, str], b: dict[str, str]) -> tuple[list[str], list[str]]:
    unfair, notes = [], []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "?"), b.get(k, "?")
        if va == vb or k == "eval.batch_size":
            continue
        if k.startswith(("model.", "fidelity", "prompts.")) and (k not in a or k not in b):
            notes.append(f"protocol {k} recorded for one test only (an older test run)")
        elif k == "eval.aupro":
            notes.append(f"AUPRO computed on one side only (eval.aupro {va} vs {vb})")
        else:
            unfair.append(f"protocol {k} differs ({va} vs {vb})")
    return unfair, notes


def used_prompt_names(test: TestResult, classes) -> dict[str, str]:
    """The names a test run used; one that logged none used aaclip's old table (for ``classes``)."""
    if test.prompt_names is not None:
        return test.prompt_names
    old = PromptNamer(test.dataset, "legacy")
    return {c: old.resolve(c).name for c in sorted(classes)}


def _prompt_names_diff(dataset: str, a: TestResult, b: TestResult) -> list[str]:
    classes = set(a.prompt_names or {}) | set(b.prompt_names or {})
    na, nb = used_prompt_names(a, classes), used_prompt_names(b, classes)
    differ = sorted(c for c in set(na) | set(nb) if na.get(c) != nb.get(c))
    if not differ:
        return []
    shown = "; ".join(f"{c}: '{na.get(c, '?')}' vs '{nb.get(c, '?')}'" for c in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    return [f"prompt names differ on {dataset} for {len(differ)} class(es) ({shown}{more})"]


def _tested_as_trained(row: Row, dataset: str) -> list[str]:
    """How a row's test on ``dataset`` ran with other model settings than its training run."""
    t = row.tests.get(dataset)
    if t is None:
        return []
    out = []
    for key, attr, name in _TRAINED_AS:
        trained = row.attrs.get(attr)
        tested = t.protocol.get(key)
        if tested is not None and trained is not None and str(tested).lower() != str(trained).lower():
            out.append(f"{row.label} was tested with {name} {tested}, trained with {trained} (test run {t.run_id[:8]})")
    return out


def fairness(row: Row, ref: Row, dataset: str, paths: tuple[set[str] | None, set[str] | None]) -> dict:
    """Why a comparison of ``row`` with ``ref`` on ``dataset`` is UNFAIR, or what to note."""
    unfair: list[str] = []
    notes: list[str] = []
    for f, name in _UNFAIR_FIELDS:
        a, b = row.attrs.get(f), ref.attrs.get(f)
        if a != b:
            unfair.append(f"{name} differs ({a} vs {b})")
    rt, ft = row.tests.get(dataset), ref.tests.get(dataset)
    if rt is None or ft is None:
        unfair.append(f"test dataset differs ({dataset} tested for {'the row' if rt else 'the reference'} only)")
    else:
        pr, pf = paths
        if pr is not None and pf is not None:
            if pr != pf:
                unfair.append(f"test images differ ({len(pr)} vs {len(pf)} images, {len(pr ^ pf)} not shared)")
        elif rt.root != ft.root:
            unfair.append(f"test data root differs ({rt.root} vs {ft.root})")
        u, n = _protocol_diff(rt.protocol, ft.protocol)
        unfair += u + _prompt_names_diff(dataset, rt, ft)
        unfair += _tested_as_trained(row, dataset) + _tested_as_trained(ref, dataset)
        notes += n
        if rt.training_data != ft.training_data and None not in (rt.training_data, ft.training_data):
            unfair.append(f"one test ran on its model's training data, the other did not "
                          f"({rt.training_data} vs {ft.training_data})")
        if not (rt.protocol_logged and ft.protocol_logged):
            notes.append("a test run predates logged protocol settings; the training recipe's are assumed")
    for who in (row, ref):
        if who.selection == "test-set":
            unfair.append(f"{who.label}: {who.selection_detail}")
    if row.selection != ref.selection and "test-set" not in (row.selection, ref.selection):
        notes.append(f"selection differs ({row.selection} vs {ref.selection})")
    for f, name in _NOTE_FIELDS:
        a, b = row.attrs.get(f), ref.attrs.get(f)
        if a != b:
            extra = ""
            if f == "epochs":
                extra = f"; {row.attrs.get('epochs_detail')} vs {ref.attrs.get('epochs_detail')}"
            notes.append(f"{name} differs ({a} vs {b}{extra})")
    return {"fair": not unfair, "verdict": "UNFAIR" if unfair else ("note" if notes else "fair"),
            "unfair": unfair, "notes": notes}


def differences(rows: list[Row], image_sets: dict[tuple[str, str], set[str] | None]) -> list[dict]:
    """Every attribute that differs between the compared rows, with each row's value."""
    out = []
    # Differences matter where results are compared: between tested rows (all rows when none is).
    rows = [r for r in rows if r.tests] or rows

    def add(name: str, severity: str, values: dict[str, Any]) -> None:
        if len({repr(v) for v in values.values()}) > 1:
            out.append({"field": name, "severity": severity, "values": values})

    add("test datasets", "unfair", {r.key: sorted(r.tests) for r in rows if r.tests})
    for f, name in _UNFAIR_FIELDS:
        add(name, "unfair", {r.key: r.attrs.get(f) for r in rows})
    datasets = sorted({d for r in rows for d in r.tests})
    for d in datasets:
        on = [r for r in rows if d in r.tests]
        add(f"protocol settings on {d}", "unfair",
            {r.key: {k: v for k, v in sorted(r.tests[d].protocol.items()) if k not in _PROTOCOL_NEUTRAL} for r in on})
        classes = {c for r in on for c in (r.tests[d].prompt_names or {})}
        add(f"prompt names on {d}", "unfair", {r.key: used_prompt_names(r.tests[d], classes) for r in on})
        sizes = {r.key: len(image_sets[(r.key, d)]) if image_sets.get((r.key, d)) is not None else None for r in on}
        sets = {frozenset(image_sets[(r.key, d)]) for r in on if image_sets.get((r.key, d)) is not None}
        if len(sets) > 1:
            out.append({"field": f"test images on {d}", "severity": "unfair", "values": sizes})
    add("selection", "unfair" if any(r.selection == "test-set" for r in rows) else "note",
        {r.key: r.selection for r in rows})
    for f, name in _NOTE_FIELDS:
        add(name, "note", {r.key: r.attrs.get(f) for r in rows})
    return out


