"""The SGLang backend's contract with SGLang, checked against the pinned release's own source
(issue 24): fastazr.rollout.sglang_contract reads every name the backend uses from the backend's
modules and looks each up, by syntax tree, in the sglang 0.5.23 wheel (fetched once with
`pip download --no-deps`, cached under ~/.cache/fastazr or $FASTAZR_CACHE). Where the wheel cannot
be fetched (no network) the source-based tests skip and say so; the rest run anyway. A copy of the
source with one used name renamed must fail the check, naming it."""

from __future__ import annotations

import ast
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import fastazr.rollout.sglang_contract as contract
from fastazr.rollout.sglang_config import SGLANG_VERSION
from fastazr.rollout.sglang_contract import OURS, FetchError, Ours, check, fetch

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("import", "Engine method", "keyword", "keyword value", "method", "ServerArgs field", "sampling key",
         "meta_info key", "output key", "logprob entry", "finish key", "finish type", "constant",
         "environment variable", "payload key", "semantics")
REQUIRED = {"release_memory_occupation", "resume_memory_occupation", "update_weights_from_tensor", "generate",
            "enable_memory_saver", "skip_tokenizer_init", "mem_fraction_static", "load_format", "random_seed",
            "tp_size", "base_gpu_id", "output_token_logprobs", "finish_reason", "Engine.generate(return_logprob=)",
            "Engine.update_weights_from_tensor(flush_cache=)"}
"""Names the issue requires the backend to use: a spot check that the extraction finds them in
the backend's modules (the checked list itself comes from those modules, not from here)."""


@pytest.fixture(scope="module")
def sglang_package() -> Path:
    try:
        return fetch()
    except FetchError as exc:
        pytest.skip(f"the sglang {SGLANG_VERSION} wheel could not be fetched, so the backend's contract with its "
                    f"source is not checked here: {exc}")


def test_every_name_the_backend_uses_exists_in_the_pinned_release(sglang_package):
    report, _ = check(sglang_package)
    assert not report.missing, "\n".join(f"{u.kind} {u.name} (used at {u.where}): {why}" for u, why in report.missing)
    kinds = Counter(u.kind for u in report.checked)
    assert all(kinds[k] > 0 for k in KINDS), f"kinds with nothing checked: {[k for k in KINDS if not kinds[k]]}"
    assert all(u.where.split(":")[0] in OURS for u in report.checked)
    assert REQUIRED <= report.names(), REQUIRED - report.names()


def test_a_name_added_to_the_backend_is_checked(sglang_package, tmp_path):
    """The checked names are read from the backend's source: a call SGLang lacks, added to a copy
    of it, is reported."""
    for name in OURS:
        shutil.copy(ROOT / "fastazr" / "rollout" / name, tmp_path / name)
    backend = tmp_path / "sglang_backend.py"
    text = backend.read_text()
    anchor = "        self.engine.release_memory_occupation(tags=tags)\n"
    assert anchor in text
    backend.write_text(text.replace(anchor, anchor + "        self.engine.swap_weights(flush=True)\n"))
    config = tmp_path / "sglang_config.py"
    config.write_text(config.read_text().replace("enable_memory_saver=True,", "enable_memory_saver=True, "
                                                 "kv_cache_fraction=0.5,"))
    report, _ = check(sglang_package, Ours(tmp_path))
    assert {u.name for u, _ in report.missing} == {"swap_weights", "kv_cache_fraction"}


# (file in the sglang package, text replaced, replacement, the name the check must report)
RENAMES = [
    ("srt/entrypoints/engine.py", "    def release_memory_occupation(self",
     "    def release_memory_occupation_v2(self", "release_memory_occupation"),
    ("srt/entrypoints/engine.py", '        flush_cache: bool = True,\n    ):\n        """Update weights from distributed',
     '        flush_cache_after: bool = True,\n    ):\n        """Update weights from distributed',
     "Engine.update_weights_from_tensor(flush_cache=)"),
    ("srt/arg_groups/fields/exec_.py", "    enable_memory_saver: A[", "    enable_memory_saving: A[",
     "enable_memory_saver"),
    ("srt/sampling/sampling_params.py", "    sampling_seed: Optional[int] = None", "    seed: Optional[int] = None",
     "sampling_seed"),
    ("srt/managers/tokenizer_manager.py", 'meta_info["output_token_logprobs"] = state',
     'meta_info["output_logprobs"] = state', "output_token_logprobs"),
    ("srt/constants.py", 'GPU_MEMORY_TYPE_KV_CACHE = "kv_cache"', 'GPU_MEMORY_TYPE_KV_CACHE = "kv"',
     "GPU_MEMORY_TYPE_KV_CACHE = 'kv_cache'"),
    ("srt/weight_sync/tensor_bucket.py", "\nclass FlattenedTensorMetadata:", "\nclass FlattenedTensorMeta:",
     "sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata"),
    ("srt/managers/schedule_batch.py", '"type": "length",', '"type": "max_tokens",', "length"),
    ("srt/layers/sampler.py", '"SGLANG_RETURN_ORIGINAL_LOGPROB"', '"SGLANG_ORIGINAL_LOGPROBS"',
     "SGLANG_RETURN_ORIGINAL_LOGPROB"),
    ("srt/model_executor/model_runner_components/weight_updater.py",
     'flattened_tensor_bucket_dict["flattened_tensor"]', 'flattened_tensor_bucket_dict["tensor"]', "flattened_tensor"),
    ("srt/layers/sampler.py", "                logits.div_(sampling_info.temperatures)", "                logits.mul_(1.0)",
     "logprobs = log softmax(logits / T)"),
    ("srt/utils/common.py", "    def serialize(obj, output_str: bool = False):",
     "    def dump(obj, output_str: bool = False):", "MultiprocessingSerializer.serialize"),
]


@pytest.fixture(scope="module")
def source_copy(sglang_package, tmp_path_factory) -> Path:
    """The files the check reads, copied: it passes on them before any rename."""
    report, source = check(sglang_package)
    copy = tmp_path_factory.mktemp("sglang-copy")
    for path in source.read:
        target = copy / path.relative_to(source.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    copied, _ = check(copy / "sglang")
    assert not copied.missing and len(copied.checked) == len(report.checked)
    return copy / "sglang"


@pytest.mark.parametrize("file, old, new, name", RENAMES, ids=[r[3] for r in RENAMES])
def test_a_renamed_name_fails_the_check(source_copy, tmp_path, file, old, new, name):
    package = tmp_path / "sglang"
    shutil.copytree(source_copy, package)
    path = package / file
    text = path.read_text()
    assert text.count(old) == 1, f"{file}: the text to rename occurs {text.count(old)} times"
    path.write_text(text.replace(old, new))
    report, _ = check(package)
    assert name in {u.name for u, _ in report.missing}, [u.name for u, _ in report.missing]


def test_setup_pins_the_release_the_contract_is_checked_against():
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(k.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                  for k in n.keywords if k.arg == "extras_require")
    pins = ast.literal_eval(extras.values[[ast.literal_eval(k) for k in extras.keys].index("sglang")])
    assert pins == [f"sglang=={SGLANG_VERSION}"]


def test_a_cached_wheel_is_not_fetched_again(tmp_path, monkeypatch):
    package = tmp_path / f"sglang-{SGLANG_VERSION}" / "src" / "sglang"
    package.mkdir(parents=True)
    (package.parent / ".complete").write_text("sglang.whl\n")

    def refuse(*args, **kwargs):
        raise AssertionError("pip ran although the source is cached")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert fetch(cache=tmp_path) == package


def test_a_failed_download_is_a_fetch_error(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement\n")
    monkeypatch.setattr(contract.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(FetchError, match="Could not find a version"):
        fetch(cache=tmp_path)
