"""Hub ids (`ORG/NAME[@REVISION]`): fetch a model's `config.json`, and nothing else, through huggingface_hub.

An estimate needs one small config file, not the weights. `fetch_config` downloads it with the real client
(`hf_hub_download`) into the normal HF cache (`models--ORG--NAME/snapshots/<commit>/config.json`, `refs/<revision>`),
so the next resolution finds it there and needs no network. What it honours is what huggingface_hub honours:

- `HF_ENDPOINT` (a mirror, or a local server in the tests), read when the fetch runs;
- `HF_TOKEN` (or the token `hf auth login` stored), sent as `Authorization: Bearer ...` by the client;
- `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`: as the user set them. The memfit CLI sets `HF_HUB_OFFLINE=1` for
  everything else it runs (loading never goes online by accident), and records the user's own setting first in
  `USER_OFFLINE_ENV`: offline only when the user asked for it;
- `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME` (memfit.models.resolve.hf_hub_cache, passed as `cache_dir`).

Every failure is one UserError line (exit 2): a gated or private repo without a token that may read it, an unknown
repo, a revision the repo does not have, a repo without config.json, an endpoint that does not answer, offline mode
with nothing cached. The client's metadata request is made first without retries, so that a machine without network
is told so at once instead of after the client's half-minute of backoff.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memfit.errors import UserError

CONFIG_FILE = "config.json"
# The user's HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as it was before the CLI set its own default.
USER_OFFLINE_ENV = "MEMFIT_USER_HF_HUB_OFFLINE"
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "ON", "YES", "TRUE"}
# Repo names as the Hub allows them (huggingface_hub.utils.validate_repo_id): letters, digits, - _ . (not -- or ..).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class HubSpec:
    """`ORG/NAME[@REVISION]`: a repo id and an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_spec(spec: str) -> HubSpec | None:
    """The Hub id `spec` names, or None when it is not of the form ORG/NAME[@REVISION]. A revision may hold
    slashes (`refs/pr/1`); the id may not."""
    spec = spec.strip()
    repo_id, at, revision = spec.partition("@")
    if at and not revision:
        return None
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME.match(part) for part in parts):
        return None
    if any(".." in part or "--" in part for part in parts):
        return None
    return HubSpec(repo_id, revision or None)


def is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in _TRUE


def user_offline() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE), not memfit's own default."""
    recorded = os.environ.get(USER_OFFLINE_ENV)
    if recorded is not None:
        return is_true(recorded)
    return is_true(os.environ.get("HF_HUB_OFFLINE")) or is_true(os.environ.get("TRANSFORMERS_OFFLINE"))


def record_user_offline() -> None:
    """Keep the user's offline setting before the CLI makes HF_HUB_OFFLINE=1 its default (see the module doc)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    os.environ.setdefault(USER_OFFLINE_ENV, value)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _has_token() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # an unreadable token file, an OIDC exchange that failed: treat as no token
        return False


@contextlib.contextmanager
def _online() -> Iterator[None]:
    """huggingface_hub reads HF_HUB_OFFLINE once, when it is imported, and the CLI has set it for everything else:
    for this one fetch, which the user did not forbid (`user_offline`), the client may go online."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _download_cmd(spec: HubSpec, filename: str | None = CONFIG_FILE) -> str:
    words = ["hf", "download", spec.repo_id] + ([filename] if filename else [])
    if spec.revision:
        words += ["--revision", spec.revision]
    return f"`{' '.join(words)}`"


def _detail(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def fetch_config(spec: HubSpec, cache_dir: Path) -> Path:
    """Download `config.json` of `spec` into the HF cache at `cache_dir`; the snapshot directory holding it.
    UserError (one line) for everything that stops it."""
    where = endpoint()
    if user_offline():
        raise UserError(
            f"{spec} is not in the HF cache ({cache_dir}) and offline mode is on (HF_HUB_OFFLINE=1), so its "
            "config.json cannot be fetched",
            f"unset HF_HUB_OFFLINE to let memfit fetch it, or fill the cache where there is network: "
            f"{_download_cmd(spec)}",
        )
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError as error:  # pragma: no cover - transformers depends on huggingface_hub
        raise UserError(f"fetching {spec} needs huggingface_hub ({error})", "pip install huggingface_hub") from None

    url = hf_hub_url(spec.repo_id, CONFIG_FILE, revision=spec.revision, endpoint=where)
    try:
        with _online():
            # No retries here: without network this fails at once (hf_hub_download would back off for ~25 s).
            get_hf_file_metadata(url, endpoint=where)
            path = hf_hub_download(spec.repo_id, CONFIG_FILE, revision=spec.revision, cache_dir=str(cache_dir),
                                   endpoint=where)
    except Exception as error:  # noqa: BLE001 - each becomes its one line (_fetch_error)
        raise _fetch_error(error, spec, where, cache_dir) from None
    return Path(path).parent


def _fetch_error(error: Exception, spec: HubSpec, where: str, cache_dir: Path) -> UserError:
    """What stopped the fetch of `spec`'s config.json, in one line and what to do (the most specific error first:
    a gated repo is also a repository not found, which is also an HTTP error)."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        from huggingface_hub.errors import EntryNotFoundError, FileMetadataError
    except ImportError:  # pragma: no cover - older huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError

        FileMetadataError = ()  # noqa: N806

    if isinstance(error, GatedRepoError):
        if _has_token():
            return UserError(f"{spec.repo_id} is a gated repo and your Hugging Face token has no access to it "
                             f"({where} answered {_status(error)})",
                             f"accept its terms on {where}/{spec.repo_id} with the account of that token, or set "
                             "HF_TOKEN to a token that has access")
        return UserError(f"{spec.repo_id} is a gated repo: its config.json needs a Hugging Face token "
                         f"({where} answered {_status(error)})",
                         f"accept its terms on {where}/{spec.repo_id}, then set HF_TOKEN=hf_... (or run "
                         "`hf auth login`)")
    if isinstance(error, RepositoryNotFoundError):
        private = "" if _has_token() else "; if it is private, set HF_TOKEN"
        return UserError(f"no model repo {spec.repo_id} on {where} ({_status(error)} repository not found), and no "
                         f"local directory {spec.repo_id}",
                         f"check the id's spelling (ORG/NAME, as on the model's page){private}; "
                         "`memfit models` lists the built-in names")
    if isinstance(error, RevisionNotFoundError):
        return UserError(f"{spec.repo_id} has no revision {spec.revision!r} on {where}",
                         f"pass a branch, tag or commit of the repo (--model {spec.repo_id}@main), or drop "
                         "@REVISION")
    if isinstance(error, EntryNotFoundError):
        return UserError(f"{spec} has no config.json on {where}: not a transformers model repo",
                         "pass the id of a repo that holds config.json (a transformers checkpoint)")
    if isinstance(error, HFValidationError):
        return UserError(f"--model {spec}: not a valid Hub id ({' '.join(str(error).split())[:160]})",
                         "write it as ORG/NAME or ORG/NAME@REVISION")
    if isinstance(error, HfHubHTTPError):
        status = _status(error)
        if status in (401, 403):
            return UserError(f"{where} refused access to {spec.repo_id} ({status})",
                             "set HF_TOKEN to a token that can read the repo")
        return UserError(f"{where} answered {status} for {spec}'s config.json", "try again later")
    if isinstance(error, FileMetadataError):
        return UserError(f"{where} does not answer like a Hugging Face Hub ({_detail(error)})",
                         "check HF_ENDPOINT (a Hub mirror's address) and any proxy settings")
    if isinstance(error, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return UserError(f"cannot write {spec}'s config.json into the HF cache {cache_dir} ({_detail(error)})",
                         "set HF_HUB_CACHE (or HF_HOME) to a directory you can write")
    # Connection refused, DNS, timeouts, TLS: the client's transport errors.
    return UserError(f"cannot reach {where} to fetch {spec}'s config.json ({_detail(error)})",
                     f"check the network (or HF_ENDPOINT), or fill the HF cache where there is network: "
                     f"{_download_cmd(spec)}; built-in shapes need no network (`memfit models`)")

