"""Hash every checkpoint a commit writes, so a refactor can be shown to change no byte.

For the commit given (default: the working tree), in a detached worktree of its own: run the
default test suite with a kept base temp directory and hash every checkpoint the tests leave there
(each directory holding a config.json with a quantization_config); optionally quantize the built-in
SmolLM2-135M as GPTQ 4-bit, AWQ 4-bit and RTN 3-bit (group 64) and hash those too. Prints one line
per file, ``sha256  checkpoint/file``; weights and metadata are listed apart, since a settings
record (meta.settings in the JSON) may change shape while every tensor stays the same.

    python bench/checkpoint_hashes.py --commit 6e88f0e --smollm2 > before.txt
    python bench/checkpoint_hashes.py --smollm2 > after.txt
    python bench/checkpoint_hashes.py --compare before.txt after.txt
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_RUNS = (("gptq", 4), ("awq", 4), ("rtn", 3))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoints(root: Path) -> list[Path]:
    found = []
    for cfg in root.rglob("config.json"):
        try:
            if "quantization_config" in json.loads(cfg.read_text()):
                found.append(cfg.parent)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return sorted(found)


def hash_lines(root: Path) -> list[str]:
    lines = []
    for ckpt in checkpoints(root):
        for f in sorted(ckpt.iterdir()):
            if f.suffix in (".safetensors", ".json"):
                kind = "weights" if f.suffix == ".safetensors" else "metadata"
                lines.append(f"{kind} {_sha256(f)}  {ckpt.relative_to(root)}/{f.name}")
    return lines


# Pins the input-statistics route (treeq.engine.calib_precision.cpu_statistics) where the commit has one:
# commit 8f8bd1f gave CPUs without AMX a kernel of their own, whose summation order changes GPTQ's
# and AWQ's bytes there by design; pinning "onednn" there reproduces the earlier arithmetic, so a
# comparison across it shows what the other commits changed.
ROUTE_PATCH = """
import os
route = os.environ.get("TREEQ_HASH_STATS_ROUTE")
if route:
    import treeq.methods.base as base
    if hasattr(base, "cpu_statistics"):
        base.cpu_statistics = lambda: route


def pytest_configure(config):
    pass
"""

SMOLLM2_SCRIPT = """
import sys, treeq
import route_patch
try:
    from treeq.engine.quant_log import QuantLog
except ImportError:  # commits before treeq/engine/ (4ddd681)
    from treeq.quant_log import QuantLog
method, bits, samples, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = treeq.QuantConfig(method=method, bits=bits, group_size=64, calib_samples=samples)
treeq.quantize(None, cfg, out, log=QuantLog(echo=lambda _: None))
"""


def run_in(
    tree: Path, work: Path, smollm2: bool, tests: tuple[str, ...], calib_samples: int, route: str | None
) -> None:
    work.mkdir(parents=True, exist_ok=True)  # pytest makes --basetemp itself, not its parents
    (work / "route_patch.py").write_text(ROUTE_PATCH)
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{work}", TREEQ_HASH_STATS_ROUTE=route or "")
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "route_patch"]
        + [f"--basetemp={work / 'tests'}", *tests],
        cwd=tree,
        env=env,
        check=False,  # a test the other commit lacks, or one that fails, still leaves the others' checkpoints
        stdout=sys.stderr,
    )
    if smollm2:
        for method, bits in SMOLLM2_RUNS:
            out = work / "smollm2" / f"{method}-w{bits}g64"
            args = [sys.executable, "-c", SMOLLM2_SCRIPT, method, str(bits), str(calib_samples), str(out)]
            subprocess.run(args, cwd=tree, env=env, check=True)


def compare(before: Path, after: Path) -> None:
    def read(p):  # hash lines only: the header lines start with "#"
        lines = [line for line in p.read_text().splitlines() if "  " in line and not line.startswith("#")]
        return {line.split("  ", 1)[1]: line.split()[1] for line in lines}

    a, b = read(before), read(after)
    shared = sorted(set(a) & set(b))
    differ = [k for k in shared if a[k] != b[k]]
    print(f"files in both: {len(shared)}; identical: {len(shared) - len(differ)}; different: {len(differ)}")
    print(f"only before: {len(set(a) - set(b))}; only after: {len(set(b) - set(a))}")
    for k in differ:
        print(f"  differs: {k}")


@click.command()
@click.option("--commit", default=None, help="git revision to build and run (default: the working tree)")
@click.option("--smollm2", is_flag=True, help="also quantize SmolLM2-135M GPTQ w4, AWQ w4, RTN w3 (minutes)")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="SmolLM2 calibration sequences")
@click.option("--stats-route", default=None, help="pin treeq.engine.calib_precision.cpu_statistics (see ROUTE_PATCH)")
@click.option("--tests", "tests", multiple=True, help="test files or ids to run (default: the whole default suite)")
@click.option("--compare", "pair", nargs=2, type=click.Path(exists=True, path_type=Path), default=None)
def main(commit, smollm2, calib_samples, stats_route, tests, pair):
    if pair:
        compare(*pair)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = REPO
        if commit:
            tree = tmp / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True)
        try:
            run_in(tree, tmp / "work", smollm2, tests, calib_samples, stats_route)
            # Bytes follow the statistics route, which follows the CPU (and $TREEQ_CPU_ISA).
            import machine

            route = f"input statistics pinned to {stats_route}"
            if not stats_route:
                route = f"{machine.calibration()} (as the working tree chooses; an older commit's may differ)"
            print(f"# {machine.cpu()}\n# {route}")
            print("\n".join(hash_lines(tmp / "work")))
        finally:
            if commit:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
