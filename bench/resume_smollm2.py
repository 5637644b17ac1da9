"""Interrupt a SmolLM2-135M quantization after a given layer, resume it, and compare the result
byte for byte with an uninterrupted run of the same command.

Each run is `treeq quantize` in its own process (the CLI a user runs). The interrupted one gets
SIGINT (Ctrl-C) as soon as OUT.partial's manifest says ``--after`` layers are done; it must exit
with the one-line resume hint and leave no OUT. The same command with ``--resume`` then finishes.
Every file of the two checkpoints is compared, apart from the run's timings (quant_log.csv and
quantize.log, which also note the resume). Prints each run's wall seconds.

    python bench/resume_smollm2.py --method gptq --after 12
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import machine  # bench/: run as a script, bench/ is on sys.path

TIMINGS = {"quant_log.csv", "quantize.log"}  # differ by design: seconds, and the resume note


def _command(method: str, bits: int, out: Path, *extra: str) -> list[str]:
    settings = ["--method", method, "--bits", str(bits), "--out", str(out), *extra]
    return [sys.executable, "-m", "cli.main", "quantize", *settings]


def _run(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - start, done


def _interrupt_after(command: list[str], manifest: Path, layers: int) -> tuple[float, str, int]:
    """Run ``command`` and send SIGINT once ``manifest`` records ``layers`` finished layers."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["done"] >= layers:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    return time.perf_counter() - start, (out + err).strip().splitlines()[-1], proc.returncode


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in TIMINGS
    }


@click.command()
@click.option("--method", default="gptq", show_default=True)
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--after", type=int, default=12, show_default=True, help="layers done when Ctrl-C arrives")
def main(method: str, bits: int, after: int) -> None:
    print(machine.cpu())
    print(machine.calibration(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        whole, broken = Path(tmp) / "whole", Path(tmp) / "resumed"
        seconds, done = _run(_command(method, bits, whole))
        if done.returncode:
            raise SystemExit(f"uninterrupted run failed: {done.stderr.strip().splitlines()[-1]}")
        print(f"uninterrupted: {seconds:.1f} s", flush=True)
        manifest = broken.with_name(broken.name + ".partial") / "resume" / "manifest.json"
        seconds, last_line, code = _interrupt_after(_command(method, bits, broken), manifest, after)
        done_layers = json.loads(manifest.read_text())["done"]
        print(f"interrupted after {done_layers} layers: {seconds:.1f} s, exit {code}, OUT exists: {broken.exists()}")
        print(f"  its last line: {last_line}", flush=True)
        seconds, done = _run(_command(method, bits, broken, "--resume"))
        if done.returncode:
            raise SystemExit(f"resumed run failed: {done.stderr.strip().splitlines()[-1]}")
        print(f"resumed: {seconds:.1f} s")
        a, b = _digests(whole), _digests(broken)
        differ = sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))
        print(f"files compared: {len(a)} ({', '.join(sorted(a))}); differing: {differ or 'none'}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
