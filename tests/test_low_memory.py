"""--low-memory streaming: the same checkpoint as the in-memory path, one layer in memory at a time."""

import json

import pytest
import torch
from conftest import make_model, save_model_dir
from safetensors.torch import load_file
from test_cli import one_line_error, quantize_args, run
from test_end_to_end import logits, quick_config

import treeq
from treeq.engine.quant_log import QuantLog
from treeq.kernels import cpu_dequantize


def _tensors(directory):
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.mark.parametrize(
    "arch,layout", [("llama", {}), ("qwen2", {}), ("gemma3_text", {}), ("llama", {"checkpoint_format": "awq"})]
)
def test_streamed_checkpoint_equals_the_in_memory_one(arch, layout, tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", arch, tokenizer)
    kw = dict(calib_text=str(text_file), log=QuantLog(str))
    cfg = quick_config(**layout, **({"static_groups": True} if layout else {}))
    memory = treeq.quantize(str(src), cfg, tmp_path / "memory", **kw)
    streamed = treeq.quantize(str(src), cfg, tmp_path / "streamed", low_memory=True, **kw)
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "streamed").glob("model-*-of-00003.safetensors"))) == 3  # 2 layers + the rest
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index.keys() == b.keys()
    qcfg = [json.loads((tmp_path / d / "quantize_config.json").read_text()) for d in ("memory", "streamed")]
    assert qcfg[0] == qcfg[1]
    assert streamed.model is None and [r.loss for r in streamed.log.records] == [r.loss for r in memory.log.records]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loaded, _ = treeq.load(tmp_path / "streamed")
    torch.testing.assert_close(logits(loaded, ids), logits(memory.model, ids), rtol=1e-4, atol=1e-5)


def test_cli_low_memory_and_its_limits(tmp_path, tokenizer, text_file):
    src = save_model_dir(tmp_path / "src", "llama", tokenizer)
    r = run(*quantize_args(src, text_file, tmp_path / "q", "--low-memory"))
    assert r.exit_code == 0, r.output
    r = run("inspect", tmp_path / "q")
    fp32 = "cpu_int4_fp32" if cpu_dequantize.available() else "torch"
    assert r.exit_code == 0 and f"cpu/float32: {fp32} for 14 modules" in r.output, r.output
    moe = save_model_dir(tmp_path / "moe", "mixtral", tokenizer)
    one_line_error(run(*quantize_args(moe, text_file, tmp_path / "m", "--low-memory")), "MoE", "without --low-memory")


def test_fp32_and_bf16_sources_of_the_same_weights_give_the_same_fp16_checkpoint(tmp_path, tokenizer, text_file):
    """Published models come in bf16; quantized from there or from fp32 copies of the same values,
    in memory or streamed, the checkpoint's tensors (unquantized ones in fp16) are identical."""
    model = make_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    outputs = []
    for dtype in (torch.float32, torch.bfloat16):
        src = tmp_path / f"src-{dtype}"
        model.to(dtype).save_pretrained(src)
        tokenizer.save_pretrained(src)
        for low_memory in (False, True):
            out = tmp_path / f"q-{dtype}-{low_memory}"
            treeq.quantize(
                str(src), quick_config(), out, calib_text=str(text_file), log=QuantLog(str), low_memory=low_memory
            )
            outputs.append(_tensors(out))
    assert outputs[0]["model.embed_tokens.weight"].dtype == torch.float16
    for other in outputs[1:]:
        assert other.keys() == outputs[0].keys()
        assert all(other[k].dtype == outputs[0][k].dtype and torch.equal(other[k], outputs[0][k]) for k in other)
