"""The model card (README.md) written into every checkpoint directory: what the model is, how it
was quantized, what it measured, and how each engine loads it."""

from __future__ import annotations

import json
from pathlib import Path

from .. import formats
from ..atomic import atomic_file
from ..schemes import ActivationScheme

CARD_NAME = "README.md"
QUANT_CONFIG_NAME = "quantize_config.json"


def _override_line(override: dict) -> str:
    if override["skip"]:
        return "kept in full precision"
    changes = {k: v for k, v in override.items() if k not in ("pattern", "skip") and v is not None}
    return ", ".join(f"{k} {v}" for k, v in changes.items())


def _settings_table(qcfg: dict) -> list[str]:
    s = qcfg["meta"]["settings"]
    w, calib = s["weights"], s["calibration"]
    rows = [
        ("method", s["method"]),
        ("bits", w["bits"]),
        ("group size", "per row" if w["group_size"] == -1 else w["group_size"]),
        ("grid", w["grid"] + ("" if w["grid"] != "minmax" else (" symmetric" if w["sym"] else " asymmetric"))),
        ("calibration", f"{calib['calib_samples']} sequences of {calib['seqlen']} tokens"),
        ("checkpoint format", formats.reading(qcfg).describe(qcfg)),
        ("unquantized tensors", s["checkpoint"]["storage_dtype"]),
    ]
    if s.get("migration"):
        rows.append(("scale migration", f"{s['migration']} {json.dumps(s['migration_options'])}"))
    if s.get("activations"):
        rows.append(("inputs (activations)", ActivationScheme(**s["activations"]).describe()))
    rows += [(f"override `{o['pattern']}`", _override_line(o)) for o in s["overrides"]]
    if s["options"]:
        rows.append(("method options", json.dumps(s["options"])))
    return ["| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]


def _loading(qcfg: dict) -> list[str]:
    lines = [
        "```python",
        "import treeq",
        'model, tokenizer = treeq.load("DIR")  # dtype=torch.bfloat16 for the fused CPU kernels',
        "```",
    ]
    loader = formats.reading(qcfg).engines(qcfg)
    if loader is None:
        reasons = [f"grid `{qcfg.get('grid')}`" if qcfg.get("grid_offset") else None]
        reasons.append("an input transform before each matmul" if qcfg.get("input_transform") else None)
        why = " and ".join(r for r in reasons if r)
        return [
            *lines,
            "",
            f"Only treeq computes this checkpoint correctly ({why}); other engines do not know its "
            f"`quant_method` and refuse it rather than run it wrongly.",
        ]
    package, vllm = loader
    return [
        *lines,
        "",
        f"transformers (with {package} installed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("DIR", dtype="float16")',
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        vllm.format(dir="DIR"),
        "```",
    ]


def card_text(qcfg: dict, perplexity: dict[str, str] | None = None) -> str:
    meta = qcfg["meta"]
    source = meta.get("source")
    s = meta["settings"]
    front = ["---", "library_name: transformers", "tags: [quantized, treeq, " + qcfg["quant_method"] + "]"]
    if source:
        front.append(f"base_model: {source}")
    bits = s["weights"]["bits"]
    title = f"# {source or 'model'}: {s['method']} {bits}-bit, quantized with treeq {meta['treeq_version']}"
    lines = [*front, "---", "", title, "", *_settings_table(qcfg), ""]
    if perplexity:
        lines += ["## Perplexity", "", "| model | perplexity |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in perplexity.items()]
        lines.append("")
    lines += ["## Loading", "", "`DIR` is this directory.", "", *_loading(qcfg), ""]
    return "\n".join(lines)


def write_model_card(directory: Path, qcfg: dict, perplexity: dict[str, str] | None = None) -> None:
    # Rewritten in a finished checkpoint by record_perplexity: never left half-written.
    with atomic_file(Path(directory) / CARD_NAME) as tmp:
        tmp.write_text(card_text(qcfg, perplexity))


def record_perplexity(directory: Path, fp, quantized) -> None:
    """Rewrite the card of a checkpoint with the perplexities measured after quantizing
    (:class:`treeq.eval.perplexity.PerplexityResult` of the fp and the quantized model)."""
    qcfg = json.loads((Path(directory) / QUANT_CONFIG_NAME).read_text())
    rows = {label: f"{r.ppl:.3f} ({r.protocol()})" for label, r in (("fp", fp), ("quantized", quantized))}
    write_model_card(directory, qcfg, rows)
