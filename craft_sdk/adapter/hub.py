"""Adapters on the Hugging Face Hub: resolve ``"org/name"`` to a cached folder, and push one back.

Local directories never need ``huggingface_hub``; a Hub id does (``pip install
'craft-sdk[hub]'``). Downloads go through ``huggingface_hub.snapshot_download``, so
its cache (``HF_HUB_CACHE`` / ``HF_HOME``) and offline mode (``HF_HUB_OFFLINE=1``)
are honoured: offline, an id resolves from the cache or fails with one line.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import AdapterError, require
from .files import ADAPTER_FILES, CONFIG_FILE, ONNX_FILE

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(ref: str | Path) -> bool:
    """Whether ``ref`` reads as a Hub repo id (``org/name``) rather than a local path."""
    text = str(ref)
    return isinstance(ref, str) and bool(_REPO_ID.match(text)) and ".." not in text and not Path(text).exists()


def _hf() -> Any:
    return require("huggingface_hub", "hub", "loading adapters from the Hugging Face Hub")


def resolve_adapter_dir(ref: str | Path, *, revision: str | None = None, subfolder: str | None = None) -> Path:
    """The local folder holding the adapter ``ref``: a directory, or a Hub repo id downloaded to the cache.

    Args:
        ref: an adapter directory, or a Hub repo id ``"org/name"``.
        revision: Hub branch, tag or commit hash (Hub ids only).
        subfolder: the adapter's folder inside the directory or repo.

    Raises:
        AdapterError: ``ref`` is neither a directory nor a Hub id, or the Hub (or, offline,
            the cache) does not have it.
        MissingDependencyError: a Hub id without ``huggingface_hub`` installed.

    Example:
        >>> resolve_adapter_dir("org/digits-adapter", revision="v1")  # doctest: +SKIP
        PosixPath('~/.cache/huggingface/hub/models--org--digits-adapter/snapshots/<commit>')
    """
    sub = _clean_subfolder(subfolder)
    if not is_hub_id(ref):
        root = Path(ref)
        if revision is not None:
            raise AdapterError(f"revision={revision!r} applies to Hub repo ids; {root} is a local path")
        return root / sub if sub else root  # a missing local adapter is reported by the loader, naming the file
    hf = _hf()
    patterns = [f"{sub}/{f}" if sub else f for f in ADAPTER_FILES]
    where = f"{ref}" + (f"@{revision}" if revision else "") + (f" ({sub})" if sub else "")
    try:
        folder = Path(hf.snapshot_download(repo_id=str(ref), revision=revision, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub's errors: offline cache miss, unknown repo/revision, HTTP
        raise AdapterError(f"cannot get adapter {where} from the Hugging Face Hub: {_why(exc, hf)}") from None
    root = folder / sub if sub else folder
    if not (root / CONFIG_FILE).is_file():
        raise AdapterError(f"Hub repo {where} has no {CONFIG_FILE}; is it a craft-sdk adapter (or in a subfolder=)?")
    logger.info("adapter %s resolved to %s", where, root)
    return root


def _clean_subfolder(subfolder: str | None) -> str:
    if not subfolder:
        return ""
    sub = subfolder.strip("/")
    if ".." in Path(sub).parts or Path(sub).is_absolute():
        raise AdapterError(f"subfolder must be a relative path inside the adapter repo, got {subfolder!r}")
    return sub


def _why(exc: Exception, hf: Any) -> str:
    errors = hf.errors
    offline = getattr(errors, "OfflineModeIsEnabled", ())
    if isinstance(exc, getattr(errors, "LocalEntryNotFoundError", ())) or isinstance(exc, offline):
        return "not in the local cache and the Hub is unreachable or HF_HUB_OFFLINE=1 (download it once online)"
    if isinstance(exc, getattr(errors, "RevisionNotFoundError", ())):
        return "no such revision"
    if isinstance(exc, getattr(errors, "RepositoryNotFoundError", ())):
        return "no such repo, or it is private (log in with `hf auth login` or pass a token)"
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _push_why(exc: Exception) -> str:
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"ConnectError", "ConnectionError", "ConnectTimeout", "TimeoutException", "OfflineModeIsEnabled"}:
        return "the Hub is unreachable (offline, or HF_HUB_OFFLINE=1); push again when online"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return f"not authorised (HTTP {status}): log in with `hf auth login` or pass token="
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload craft-sdk adapter",
    path_in_repo: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the adapter files of ``folder`` in one commit.

    Returns:
        The URL of the commit (as ``huggingface_hub`` reports it).
    """
    hf = _hf()
    api = hf.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo or "", revision=revision,
            commit_message=commit_message, allow_patterns=list(ADAPTER_FILES),
        )
    except Exception as exc:  # huggingface_hub's and its HTTP library's errors: offline, auth, quota
        raise AdapterError(f"cannot push the adapter to {repo_id} on the Hugging Face Hub: {_push_why(exc)}") from None
    logger.info("pushed adapter to %s", repo_id)
    return str(getattr(info, "commit_url", info))


def push_adapter(adapter: Any, repo_id: str, *, source_dir: str | Path | None = None, **kwargs: Any) -> str:
    """Save ``adapter`` (with its model card and, from ``source_dir``, its ``refiner.onnx``) and push it.

    Args:
        adapter: an :class:`~craft_sdk.Adapter`.
        repo_id: the Hub repo ``"org/name"``.
        source_dir: the adapter's directory, whose exported ``refiner.onnx`` is uploaded
            too when it matches the adapter (checked by ``adapter.onnx_refiner``: the Hub round trip
            does not depend on the exporter).
        **kwargs: see :func:`push_folder` (``revision``, ``private``, ``token``, ``commit_message``).
    """
    if not _REPO_ID.match(repo_id):
        raise AdapterError(f"repo_id must look like 'org/name', got {repo_id!r}")
    _hf()
    staging = Path(tempfile.mkdtemp(prefix="craft-push-"))
    try:
        target = adapter.save_pretrained(staging / "adapter", repo_id=repo_id)
        onnx = Path(source_dir) / ONNX_FILE if source_dir is not None else None
        if onnx is not None and onnx.is_file():
            adapter.onnx_refiner(onnx)  # refuses a stale or foreign refiner.onnx before anything is sent
            shutil.copy2(onnx, target / onnx.name)
        return push_folder(target, repo_id, **kwargs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
