"""Per-module ParoQuant: treeq vs the official ``paroquant==0.1.16`` package vs RTN, side by side.

For each shape, all implementations get the same weight, the same 192 training + 64 validation
input rows, 4-bit, krot 8, the same mini-batches and epochs, one process, the stated thread count.
"val loss" is the same measure for all: SmoothL1 between the quantized and the fp layer output on
the validation rows, computed here from each implementation's final dense (pseudo-quantized) weight.

The official package is used as shipped except for two things it cannot do on a CPU-only machine:
its ``rotation::rotate`` op exists only as a CUDA extension compiled at import, so a CPU
implementation of that op is registered here and its ``paroquant.kernels.cuda`` package is entered
without running the compile in ``__init__``; and its ``optim.util`` imports ``datasets`` at the top
(for calibration loading we do not use), which is given an empty placeholder module. Its per-module
time counts its pair schedule plus its two training stages, as its optimize script runs them.

    pip install --no-deps paroquant==0.1.16
    flock /tmp/treeq-heavy.lock python bench/paroquant_module.py --threads 1
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import click
import machine
import torch
import torch.nn.functional as F

import treeq
from treeq.methods import make_method
from treeq.methods.paroquant import RowSampleStats

TRAIN_ROWS, VAL_ROWS, BATCH_ROWS, KROT, BITS = 192, 64, 32, 8, 4


# ---- the official package, entered on CPU -------------------------------------------------------


def _cpu_rotate(x, idx_ij, theta, scales=None, group_size=128):
    """The official op's semantics (read from its CUDA source): optional per-channel scale, then
    krot layers; pair t of group g at idx_ij[r, g*gs + 2t : +2] (group-local), angle theta[r, g*gs/2 + t],
    x_i' = x_i cos + x_j sin, x_j' = x_j cos - x_i sin. Computed in fp32."""
    shape, n = x.shape, x.shape[-1]
    y = x.reshape(-1, n).float()
    if scales is not None:
        y = y * scales.reshape(1, n).float()
    y = y.clone()
    gs = int(group_size)
    offsets = torch.arange(n // gs, device=x.device).repeat_interleave(gs // 2) * gs
    for r in range(idx_ij.shape[0]):
        local = idx_ij[r].long().reshape(-1, 2)
        i, j = local[:, 0] + offsets, local[:, 1] + offsets
        c, s = torch.cos(theta[r].float()), torch.sin(theta[r].float())
        a, b = y[:, i], y[:, j]
        y[:, i], y[:, j] = a * c + b * s, b * c - a * s
    return y.to(x.dtype).reshape(shape)


def load_official():
    """Import the official optimisation code with the CPU op in place of its CUDA extension."""
    lib = torch.library.Library("rotation", "DEF")
    lib.define("rotate(Tensor x, Tensor idx_ij, Tensor theta, Tensor? scales=None, int group_size=128) -> Tensor")
    lib.impl("rotate", _cpu_rotate, "CPU")
    placeholder = types.ModuleType("datasets")

    def load_dataset(*_args, **_kwargs):
        raise RuntimeError("datasets is a placeholder in this benchmark")

    placeholder.load_dataset = load_dataset
    sys.modules.setdefault("datasets", placeholder)
    spec = importlib.util.find_spec("paroquant")
    if spec is None:
        raise SystemExit("official package missing: pip install --no-deps paroquant==0.1.16")
    cuda_dir = Path(spec.submodule_search_locations[0]) / "kernels" / "cuda"
    import paroquant.kernels

    package = types.ModuleType("paroquant.kernels.cuda")
    package.__path__ = [str(cuda_dir)]
    sys.modules["paroquant.kernels.cuda"] = package
    from paroquant.kernels.cuda.autograd import scaled_pairwise_rotation

    package.scaled_pairwise_rotation = scaled_pairwise_rotation
    paroquant.kernels.cuda = package
    from paroquant.optim import qlinear, rotation, train

    return lib, qlinear, rotation, train


def run_official(official, w, x_train, x_val, group_size, epochs, seed=0):
    _, qlinear, rotation, train = official
    start = time.perf_counter()
    n_in = w.shape[1]
    grouped = w.view(w.shape[0], -1, group_size).permute(1, 0, 2)
    pairs = train.get_random_rotation_pairs(grouped, group_size, KROT, 0.5, seed)
    pairs = [torch.tensor(p, dtype=torch.int32) for p in pairs]
    kernel_data = rotation.transform_to_kernel_data(pairs, [torch.zeros(p.shape[0]) for p in pairs], group_size)
    linear = torch.nn.Linear(n_in, w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    module = qlinear.PseudoQuantizedLinear(
        linear,
        list(kernel_data),
        torch.ones(1, n_in, dtype=torch.float16),
        group_size=group_size,
        n_bits=BITS,
        num_rotations=torch.tensor(KROT),
    ).float()  # its optimize script runs the layer in fp32: layer.float()
    setup = time.perf_counter() - start
    y_train, y_val = x_train @ w.T, x_val @ w.T
    batches = ([(x,) for x in x_train.split(BATCH_ROWS)], list(y_train.split(BATCH_ROWS)))
    val = ([(x_val,)], [y_val])
    stages = [{"channel_scales": 0.05, "angles": 0.05}, {"weight": 1e-5, "quantizer": 1e-6}]
    for lrs, n_epochs in zip(stages, epochs):
        module.set_optim_enabled(**{k: True for k in lrs})
        groups = [
            dict(params=module.get_optim_params(k), lr=lr, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-10)
            for k, lr in lrs.items()
        ]
        train.optimize_module(
            module,
            batches,
            val,
            {},
            {},
            groups,
            loss_fn="smooth_l1",
            n_iter=n_epochs,
            early_stop=None,
            post_optim_callback=qlinear.reset_angles_by_mask,
        )
    seconds = time.perf_counter() - start
    return module.pseudo_weight().float(), seconds, setup


# ---- treeq ---------------------------------------------------------------------------------------


def run_treeq(method_name, w, x_train, x_val, group_size, epochs, **options):
    cfg = treeq.QuantConfig(
        method=method_name,
        bits=BITS,
        group_size=group_size,
        sym=False,
        options=(
            dict(
                krot=KROT,
                epochs=list(epochs),
                train_rows=TRAIN_ROWS,
                val_rows=VAL_ROWS,
                batch_rows=BATCH_ROWS,
                **options,
            )
            if method_name == "paroquant"
            else {}
        ),
    )
    method = make_method(cfg)
    # Validation rows first: the method's split takes them from the front of its sample.
    stats = RowSampleStats(w.shape[1], torch.device("cpu"), TRAIN_ROWS + VAL_ROWS, 0)
    stats.add(torch.cat([x_val, x_train]))
    stats.rows = torch.cat([x_val, x_train])  # exactly these rows, in this order
    start = time.perf_counter()
    result = method.quantize(w, stats)
    return result.weight(), time.perf_counter() - start


# ---- data ----------------------------------------------------------------------------------------


def synthetic(n_in, n_out, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * 0.02
    x = torch.randn(TRAIN_ROWS + VAL_ROWS, n_in, generator=g)
    loud = torch.randperm(n_in, generator=g)[: max(1, n_in // 100)]
    x[:, loud] *= 20
    return w, x[:TRAIN_ROWS], x[TRAIN_ROWS:]


def smollm2_modules(layer_index, names, seed):
    """Real weights and their real inputs (tokens of wiki-train) from SmolLM2-135M."""
    from treeq import data

    model, tok = treeq.load_fp_model()
    ids = data.calibration_batches(tok, data.read_text("wiki-train"), 4, 512, 4)[0]
    layer = model.model.layers[layer_index]
    captured = {}

    def recorder(name):
        def hook(_module, args):
            captured[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    hooks = [layer.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        rows = captured[n][torch.randperm(captured[n].shape[0], generator=g)[: TRAIN_ROWS + VAL_ROWS]]
        out[n] = (layer.get_submodule(n).weight.detach().clone(), rows[:TRAIN_ROWS], rows[TRAIN_ROWS:])
    return out


def val_loss(w_hat, w, x_val) -> float:
    return float(F.smooth_l1_loss(x_val @ w_hat.T, x_val @ w.T))


@click.command()
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--epochs", default="10,10", show_default=True)
@click.option("--large-epochs", default="2,2", show_default=True, help="for 8192->2048")
@click.option("--shapes", default="2048x512,2048x2048,8192x2048", show_default=True)
@click.option("--real/--no-real", default=True, show_default=True, help="also SmolLM2 layer 10 modules (g64)")
@click.option("--skip-official", is_flag=True)
def main(threads, epochs, large_epochs, shapes, real, skip_official):
    torch.set_num_threads(threads)
    official = None if skip_official else load_official()
    epochs, large = tuple(map(int, epochs.split(","))), tuple(map(int, large_epochs.split(",")))
    cases = []
    for i, shape in enumerate(shapes.split(",")):
        n_in, n_out = map(int, shape.split("x"))
        cases.append((f"synthetic {n_in}->{n_out}", *synthetic(n_in, n_out, i), 128, large if n_in >= 8192 else epochs))
    if real:
        names = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
        for n, (w, xt, xv) in smollm2_modules(10, names, 0).items():
            cases.append((f"smollm2 L10 {n} {w.shape[1]}->{w.shape[0]}", w, xt, xv, 64, epochs))
    cases.sort(key=lambda case: case[1].numel())  # small first: partial output is still a table
    print(
        f"threads={threads} bits={BITS} krot={KROT} rows={TRAIN_ROWS}+{VAL_ROWS} batch={BATCH_ROWS} "
        f"torch={torch.__version__}"
    )
    print(f"{machine.cpu()}; no treeq kernel runs here: each implementation trains in torch ops")
    print(f"{'case':<40} {'g':>4} {'epochs':>6} {'impl':<22} {'seconds':>8} {'val loss':>11} {'t/off':>6} {'L/off':>6}")
    for name, w, xt, xv, gs, ep in cases:
        rows = {}
        if official is not None:
            w_hat, sec, setup = run_official(official, w, xt, xv, gs, ep)
            rows["official 0.1.16"] = (sec, val_loss(w_hat, w, xv))
            rows["  (its schedule setup)"] = (setup, float("nan"))
        variants = (
            ("treeq default", {}),
            ("treeq schedule=round_robin", {"schedule": "round_robin"}),
            ("treeq reference lrs", {"lr_rotation": 0.05, "lr_weight": 1e-5, "lr_quantizer": 1e-6}),
        )
        for label, kw in variants:
            w_hat, sec = run_treeq("paroquant", w, xt, xv, gs, ep, **kw)
            rows[label] = (sec, val_loss(w_hat, w, xv))
        w_hat, sec = run_treeq("rtn", w, xt, xv, gs, ep)
        rows["rtn (asym)"] = (sec, val_loss(w_hat, w, xv))
        ref = rows.get("official 0.1.16")
        for label, (sec, loss) in rows.items():
            t_ratio = sec / ref[0] if ref else float("nan")
            l_ratio = loss / ref[1] if ref else float("nan")
            print(
                f"{name:<40} {gs:>4} {'+'.join(map(str, ep)):>6} {label:<22} {sec:>8.2f} {loss:>11.4e} "
                f"{t_ratio:>6.2f} {l_ratio:>6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
