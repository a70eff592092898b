"""Where a benchmark's datasets come from: local hub snapshots (`--datasets DIR`, each checked before the model is
loaded) or the Hub itself, whose reachability is checked before the model is loaded too."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from layermoe_ds.errors import InputError, MissingInputError


def leaf_configs(index: dict, name: str) -> Iterator[dict]:
    """The task configs under a task, group or tag name (lm-eval's index), for their datasets."""
    entry = index.get(name)
    if entry is None:
        return
    kind = entry.kind.name
    if kind in ("TASK", "PY_TASK"):
        yield entry.cfg or {}
    elif kind == "GROUP":
        for sub in (entry.cfg or {}).get("task", []):
            yield from (leaf_configs(index, sub) if isinstance(sub, str) else [sub])
    elif kind == "TAG":
        for other in index.values():
            if name in (other.tags or ()) and other.kind.name in ("TASK", "PY_TASK"):
                yield other.cfg or {}


def check_datasets(index: dict, tasks: Sequence[str], root: Path) -> None:
    """Every dataset the tasks read must be under `root` as its hub repository's snapshot: one line naming the
    first that is not, and how to fetch it, before any model is loaded."""
    for task in tasks:
        for config in leaf_configs(index, task):
            repo = config.get("dataset_path")
            if repo and not (root / repo).is_dir():
                raise MissingInputError(
                    f"benchmark --datasets: {root / repo} is missing (task {task}); where there is network: "
                    f"hf download {repo} --repo-type dataset --local-dir {root / repo}"
                )


# datasets' packaged builders: a task that names one reads local files, not a hub repository.
PACKAGED_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}


def check_hub_reachable(index: dict, tasks: Sequence[str], timeout: float = 10.0) -> None:
    """Without --datasets the tasks read their datasets from the Hub: where it cannot be reached (an offline
    cluster), one line naming --datasets and the download command, before the model is loaded (lm-eval would end in
    a ConnectionError traceback after loading it). Skipped under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the user's
    own cache then serves."""
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return
    repos = sorted(
        {
            repo
            for task in tasks
            for config in leaf_configs(index, task)
            if (repo := config.get("dataset_path")) and repo not in PACKAGED_BUILDERS and not Path(repo).exists()
        }
    )
    if not repos:
        return
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(f"{constants.ENDPOINT}/api/datasets/{repos[0]}", method="HEAD"),
                               timeout=timeout)  # fmt: skip
    except urllib.error.HTTPError:
        return  # the Hub answered (a private or renamed dataset is lm-eval's to report)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(
            f"benchmark: the Hub ({constants.ENDPOINT}) cannot be reached ({reason}) for the datasets "
            f"{', '.join(repos)}; offline, give --datasets DIR holding each as `hf download REPO --repo-type dataset "
            f"--local-dir DIR/REPO` writes it, e.g. hf download {repos[0]} --repo-type dataset --local-dir "
            f"DIR/{repos[0]}"
        ) from exc


@contextlib.contextmanager
def local_datasets(root: Path | None):
    """Within the block, lm-eval's `datasets.load_dataset(path=REPO, …)` reads `root/REPO` where it exists, with
    the hub switched off."""
    if root is None:
        yield
        return
    import datasets

    original = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        local = Path(root) / str(path)
        return original(str(local) if local.is_dir() else path, *args, **kwargs)

    saved = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
