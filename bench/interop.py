"""treeq's SmolLM2 checkpoints in other tools' loaders, and theirs in treeq's, on this CPU.

    python bench/interop.py --side-python /path/to/venv/bin/python [--work DIR] [--windows 16]

The side Python has GPTQModel, transformers and compressed-tensors (GPTQModel asks for a newer torch
than treeq's, so it lives in its own environment with torch pinned to treeq's version); it runs this
same file as `side ...` and never imports treeq. The main run quantizes SmolLM2-135M with treeq
(GPTQ 4-bit g64: sym/asym x act-order on/off, the latter two also as compressed-tensors; an RTN
half-step grid),
has GPTQModel quantize it too, then for each checkpoint compares wiki-test perplexity, logits and
top-1 tokens of the foreign loader with `treeq.load`'s in the same dtype (bf16), beside the distance
between treeq's own reference (`torch`) and fast kernels. Checkpoints are reused when present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SEQLEN = 1024
LOGIT_WINDOWS = 2  # windows whose full logits are compared (each is 1024 x 49152 values)


def score(model, ids: torch.Tensor) -> dict:
    """Summed NLL and top-1 tokens over windows ``ids`` [w, SEQLEN], and the first windows' logits:
    the same code scores every loader."""
    nll, argmax, kept = 0.0, [], []
    with torch.no_grad():
        for w, x in enumerate(ids):
            logits = model(input_ids=x[None], use_cache=False).logits[0]
            nll += F.cross_entropy(logits[:-1].float(), x[1:], reduction="sum").item()
            argmax.append(logits.argmax(-1))
            if w < LOGIT_WINDOWS:
                kept.append(logits.to(torch.bfloat16))
    return {"nll": nll, "count": ids.shape[0] * (SEQLEN - 1), "argmax": torch.stack(argmax), "logits": kept}


# ---- run by the side Python: GPTQModel / transformers only ------------------------------------


def side_load(loader: str, path: str):
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def side(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "score":  # score LOADER CKPT IDS OUT
        loader, path, ids, out = argv[1:]
        try:
            model = side_load(loader, path)
        except Exception as e:  # a refusal is a result too
            torch.save({"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}, out)
            return
        torch.save(score(model, torch.load(ids)), out)
    elif kind == "quantize":  # quantize SRC OUT TEXTS_JSON: GPTQModel's own GPTQ 4-bit g64 checkpoint
        from gptqmodel import GPTQModel, QuantizeConfig

        src, out, texts = argv[1:]
        model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=64, sym=True, desc_act=True), device="cpu")
        model.quantize(json.loads(Path(texts).read_text()), batch_size=8)
        model.save(out)


# ---- the main run (treeq) ---------------------------------------------------------------------

# Calibration is shortened (the loaders read the same bits whatever the calibration); the default
# 128 x 512 tokens would take each GPTQ run several times longer on a shared 2-core machine.
CALIBRATION = dict(calib_samples=32, seqlen=512)
VARIANTS = {  # name -> QuantConfig settings on top of GPTQ 4-bit g64
    "gptq-sym-actorder": dict(),
    "gptq-sym": dict(desc_act=False),
    "gptq-asym-actorder": dict(sym=False),
    "gptq-asym": dict(sym=False, desc_act=False),
    "rtn-half-step": dict(method="rtn", grid="half-step"),
}
# compressed-tensors exports: the same bits as a GPTQ checkpoint without act-order, laid out anew.
RELAYOUTS = {"ct-sym": "gptq-sym", "ct-asym": "gptq-asym"}
FOREIGN = {"ct": "transformers"}  # checkpoint family -> the loader that reads it (else GPTQModel)
SIDE_ENV = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")  # GPTQModel's default CPU pool wants more than 2 cores


def run_side(side_python: str, *args: str) -> None:
    # -P: none of bench/'s scripts on the side venv's sys.path, where one could pass for a package it imports.
    subprocess.run([side_python, "-P", __file__, "side", *args], check=True, env=SIDE_ENV)


def as_compressed_tensors(src: Path, dst: Path) -> None:
    """The GPTQ checkpoint ``src`` rewritten as treeq writes compressed-tensors: the same codes,
    scales and zero points in the pack-quantized layout, with its quantization_config."""
    import shutil

    from safetensors.torch import load_file, save_file

    from treeq.formats import compressed_tensors as ct
    from treeq.storage.loading import in_runtime_layout, read_quantization_config

    qcfg = read_quantization_config(src)
    state = in_runtime_layout(load_file(src / "model.safetensors"), qcfg)
    shutil.copytree(src, dst)
    save_file(ct.to_compressed_tensors(state, qcfg["bits"], qcfg["sym"], qcfg["group_size"]), dst / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = ct.quantization_config(
        qcfg["bits"], qcfg["sym"], qcfg["group_size"], ["lm_head"], qcfg["meta"]
    )
    (dst / "config.json").write_text(json.dumps(hf, indent=2))
    (dst / "quantize_config.json").write_text(json.dumps(hf["quantization_config"], indent=2))


def ensure_checkpoints(work: Path, side_python: str) -> None:
    import treeq
    from treeq.data import builtin_text, calibration_batches

    for name, settings in VARIANTS.items():
        if not (work / name).is_dir():
            cfg = treeq.QuantConfig(**{"method": "gptq", "bits": 4, "group_size": 64, **CALIBRATION, **settings})
            treeq.quantize(None, cfg, work / name)
    for name, src in RELAYOUTS.items():
        if not (work / name).is_dir():
            as_compressed_tensors(work / src, work / name)
    if not (work / "by-gptqmodel").is_dir():
        from treeq.default_model import default_model_path

        _, tok = treeq.load_fp_model()
        batches = calibration_batches(tok, builtin_text("wiki-train"), CALIBRATION["calib_samples"], 512, 8)
        texts = work / "calibration.json"
        texts.write_text(json.dumps([tok.decode(row) for b in batches for row in b]))
        run_side(side_python, "quantize", str(default_model_path()), str(work / "by-gptqmodel"), str(texts))


def wiki_windows(windows: int) -> torch.Tensor:
    import treeq
    from treeq.data import builtin_text, tokenize

    _, tok = treeq.load_fp_model()
    ids = tokenize(tok, builtin_text("wiki-test"))
    return ids[: windows * SEQLEN].reshape(windows, SEQLEN)


def compare(a: dict, b: dict) -> dict:
    la, lb = torch.cat(a["logits"]).float(), torch.cat(b["logits"]).float()
    return {
        "ppl": math.exp(a["nll"] / a["count"]),
        "ppl_ref": math.exp(b["nll"] / b["count"]),
        "logits_rel": ((la - lb).norm() / lb.norm()).item(),
        "top1": (a["argmax"] == b["argmax"]).float().mean().item(),
    }


def run(work: Path, side_python: str, windows: int) -> list[str]:
    import machine

    import treeq

    ensure_checkpoints(work, side_python)
    ids = wiki_windows(windows)
    ids_file = work / "ids.pt"
    torch.save(ids, ids_file)
    rows = [
        machine.cpu(),
        "",
        "| checkpoint | loader | ppl (loader) | ppl (treeq fast) | ppl diff | logits rel. dist. | top-1 agree "
        "| treeq ref vs fast: logits dist. / top-1 | treeq fast kernels |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in [*VARIANTS, *RELAYOUTS, "by-gptqmodel"]:
        path = work / name
        loader = FOREIGN.get(name.split("-")[0], "gptqmodel")
        out = work / f"{name}.{loader}.pt"
        run_side(side_python, "score", loader, str(path), str(ids_file), str(out))
        theirs = torch.load(out)
        if "error" in theirs:
            rows.append(f"| {name} | {loader} | refused: `{theirs['error'][:150]}` | | | | | | |")
            continue
        fast_model = treeq.load(path, dtype=torch.bfloat16)[0]
        fast = score(fast_model, ids)
        ref = score(treeq.load(path, dtype=torch.bfloat16, kernel="torch")[0], ids)
        c, k = compare(theirs, fast), compare(ref, fast)
        rows.append(
            f"| {name} | {loader} | {c['ppl']:.3f} | {c['ppl_ref']:.3f} | {100 * (c['ppl'] / c['ppl_ref'] - 1):+.2f}% "
            f"| {c['logits_rel']:.4f} | {100 * c['top1']:.2f}% | {k['logits_rel']:.4f} / {100 * k['top1']:.2f}% "
            f"| {machine.kernels(fast_model)} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "side":
        side(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--side-python", required=True, help="a Python with gptqmodel, transformers, compressed-tensors"
    )
    parser.add_argument("--work", type=Path, default=Path("treeq-out/interop"))
    parser.add_argument("--windows", type=int, default=16, help=f"wiki-test windows of {SEQLEN} tokens")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print("\n".join(run(args.work, args.side_python, args.windows)))


if __name__ == "__main__":
    main()
