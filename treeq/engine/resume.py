"""Resumable quantize runs: after each finished decoder layer, what the run needs to go on from the
next one exactly as if it had never stopped, kept in ``OUT.partial/resume/``.

- ``layer-NNNNN.pt`` (in-memory runs): the finished layer's state dict (fake-quantized weights,
  folded scales) and its QuantResults; streamed runs have already written the layer's shard to
  ``OUT.partial``, the directory that becomes ``OUT``;
- ``step-NNNNN.pt``: the hidden states the looper carries out of layer NNNNN, the log so far, and a
  streamed run's shard index and format summary;
- ``manifest.json``, written last, is the commit point: what the run is (:func:`run_identity`) and
  how many layers are done. Every file is written under a temporary name and renamed, so an
  interruption leaves the previous state or the next one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import QuantConfig
from ..errors import TreeqError
from ..version import __version__
from .quant_log import QuantLog

STATE_DIR = "resume"
MANIFEST = "manifest.json"
_SAMPLES = 4096  # values hashed per tensor of a loaded model
_FILE_SPAN = 2**20  # bytes hashed at each end of a weight file


def partial_dir(out: Path) -> Path:
    """Where a run writing ``out`` keeps its progress: beside it, never taken for a checkpoint."""
    return out.with_name(out.name + ".partial")


def model_fingerprint(model) -> str:
    """A loaded model's identity: its config and an evenly spaced sample of every tensor (hashing
    every weight would cost seconds per GB on every run)."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // _SAMPLES)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def directory_fingerprint(path: Path) -> str:
    """A model directory's identity without reading its weights: config.json, and each weight
    file's size and first and last MiB (the safetensors header and tensors at both ends)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as handle:
            h.update(handle.read(_FILE_SPAN))
            handle.seek(max(0, size - _FILE_SPAN))
            h.update(handle.read(_FILE_SPAN))
    return h.hexdigest()


def run_identity(config: QuantConfig, batches: list[torch.Tensor], source: str, streamed: bool, layers: int) -> dict:
    """What must be equal for saved progress to continue this run bit for bit."""
    calibration = hashlib.sha256()
    for b in batches:
        calibration.update(f"{tuple(b.shape)}".encode() + b.cpu().numpy().tobytes())
    return {  # in the order a mismatch is looked for: the way the model is read decides its fingerprint
        "treeq": __version__,
        "low_memory": "with --low-memory" if streamed else "without --low-memory",
        "model": source,
        "layers": layers,
        "settings": hashlib.sha256(config.model_dump_json().encode()).hexdigest(),
        "calibration": calibration.hexdigest(),
    }


# How a mismatch is told, by the identity field that differs.
_MISMATCH = {
    "treeq": "was made by another treeq version",
    "settings": "was made with other quantization settings",
    "model": "is of another model",
    "calibration": "was calibrated on other text or windows",
    "low_memory": "was made {theirs}",
    "layers": "is of a model with another number of layers",
}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with finished layers kept: says how far the run got and where its state is."""

    def __init__(self, done: int, total: int, work: Path):
        super().__init__(done, total, work)
        self.done, self.total, self.work = done, total, work

    def told(self, how: str) -> str:
        """One line: how far the run got, and ``how`` to continue it."""
        return f"interrupted after {self.done} of {self.total} decoder layers, kept in {self.work}; continue with {how}"

    def __str__(self) -> str:
        return self.told("the same arguments and treeq.quantize(..., resume=True)")


class Progress:
    """The saved progress of the run writing ``out``. Opening it refuses at once, before any work,
    to start over an interrupted run without ``resume`` or to resume nothing."""

    def __init__(self, out: Path, resume: bool, log: QuantLog):
        self.work, self.log, self.fresh = partial_dir(out), log, not resume
        self.state = self.work / STATE_DIR
        manifest = self.state / MANIFEST
        self.saved = json.loads(manifest.read_text()) if manifest.is_file() else None
        if resume and self.saved is None:
            raise TreeqError(f"nothing to resume: no finished layer in {self.work}; run without --resume")
        if not resume and self.work.exists():
            raise TreeqError(
                f"{self.work} holds an interrupted run; add --resume to continue it, or remove it to start over"
            )
        self.done = self.saved["done"] if self.saved else 0
        self.identity: dict = {}
        # The files of the last finished layer are written in a thread while the next layer runs:
        # SmolLM2's hidden states are 150 MB a layer, and writing them took 0.35 s of every layer.
        self._writing: threading.Thread | None = None
        self._write_failed: BaseException | None = None

    def check(self, identity: dict) -> None:
        """Refuse saved progress of another run; call before anything is written."""
        self.identity = identity
        if self.saved is None:
            return
        for key, theirs in self.saved["identity"].items():
            if identity.get(key) != theirs:
                problem = _MISMATCH[key].format(theirs=theirs)
                raise TreeqError(
                    f"{self.work} {problem}; resume with what made it, or remove it to start over without --resume"
                )

    def _step(self, index: int) -> Path:
        return self.state / f"step-{index:05d}.pt"

    def _layer(self, index: int) -> Path:
        return self.state / f"layer-{index:05d}.pt"

    def layer_done(self, index: int, layer, results: dict, hidden: list[torch.Tensor], fp_hidden, stream=None) -> None:
        """Keep decoder layer ``index`` (finished, on the CPU) and the hidden states out of it (the
        fp model's too, where distillation carries them; else ``fp_hidden`` is None). In memory the
        files are written in a thread (:meth:`flush` waits for them): the looper replaces the hidden
        states and moves on to other layers, never changing these tensors, and the lists are copied
        here. A streamed run's bookkeeping changes with its next layer, so it writes at once."""
        self.flush()
        self.state.mkdir(parents=True, exist_ok=True)
        kept = None if stream is not None else {"state": layer.state_dict(), "results": dict(results)}
        step = {
            "hidden": list(hidden),
            "fp_hidden": None if fp_hidden is None else list(fp_hidden),
            "records": list(self.log.records),
            "lines": list(self.log.lines),
            "stream": None if stream is None else (stream.weight_map, stream.summary),
        }
        if stream is not None:
            return self._write(index, kept, step)
        self._writing = threading.Thread(target=self._write_in_thread, args=(index, kept, step), daemon=True)
        self._writing.start()

    def _write(self, index: int, kept: dict | None, step: dict) -> None:
        if kept is not None:
            _write_atomic(self._layer(index), lambda p: torch.save(kept, p))
        _write_atomic(self._step(index), lambda p: torch.save(step, p))
        manifest = json.dumps({"identity": self.identity, "done": index + 1}, indent=2)
        _write_atomic(self.state / MANIFEST, lambda p: p.write_text(manifest))  # the commit point
        self.done = index + 1
        self._step(index - 1).unlink(missing_ok=True)

    def _write_in_thread(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # raised in the run's own thread by flush()
            self._write_failed = e

    def flush(self) -> None:
        """Wait for the last finished layer's files; raise what failed in writing them."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._write_failed is not None:
            failed, self._write_failed = self._write_failed, None
            raise failed

    def restore(self, layers, device, stream=None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, dict]:
        """Put the finished layers back (in memory: their saved state; streamed: the shard index)
        and return the hidden states into the next layer (the quantized model's and the fp
        model's, None where the run carries none) and the finished layers' results."""
        # Pickles (QuantResults carry transforms and quantizers), read only from the directory
        # this run's own output sits beside.
        step = torch.load(self._step(self.done - 1), map_location=device, weights_only=False)
        self.log.records[:], self.log.lines[:] = step["records"], step["lines"]
        self.log.say(f"resumed after {self.done} of {len(layers)} decoder layers from {self.work}")
        results: dict = {}
        if stream is not None:
            stream.weight_map, stream.summary = step["stream"]
            return step["hidden"], step["fp_hidden"], results
        for index in range(self.done):
            kept = torch.load(self._layer(index), weights_only=False)
            layers[index].load_state_dict(kept["state"])
            results.update(kept["results"])
        return step["hidden"], step["fp_hidden"], results

    @contextmanager
    def interruptible(self):
        """Around the layer loop and the saving after it, with the work directory made (streamed
        runs write shards there): Ctrl-C keeps the finished layers and raises :class:`Interrupted`;
        any other failure of a fresh run leaves nothing behind, as before resuming existed (a
        resumed run keeps its state, so a failed save of one resumes at once)."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            yield
        except KeyboardInterrupt:
            self._settle()
            if self.done == 0 and self.fresh:
                self.discard()
                raise
            raise Interrupted(self.done, self.identity["layers"], self.work) from None
        except BaseException:
            self._settle()
            if self.fresh:
                self.discard()
            raise

    def _settle(self) -> None:
        """On the way out of a failed or interrupted run: the last layer's files are whole or
        not written (the manifest then names the layer before); a failure writing them is not
        the failure to report."""
        try:
            self.flush()
        except BaseException:
            pass

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def complete(self, out: Path) -> None:
        """A streamed run's work directory, its state removed, becomes ``out``."""
        shutil.rmtree(self.state, ignore_errors=True)
        self.work.rename(out)
