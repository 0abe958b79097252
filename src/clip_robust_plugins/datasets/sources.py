"""Where grouped shards come from: a local directory or an http(s) URL, and never a shell.

clip_benchmark 1.6.2 reads a ``wds/`` root given as a URL by running
``os.popen("curl -L -s --fail '<url>'")`` (a shell command with the URL inside it) and
hands shard URLs to webdataset, whose ``gopen`` runs ``curl`` for http(s) and a shell for
``pipe:`` URLs.  A dataset root or shard name is untrusted text, so here:

- a root is a local directory, a ``file://`` URL or an ``http(s)://`` URL (with
  clip_benchmark's rewriting of ``https://huggingface.co/datasets/<user>/<repo>/tree/<branch>``
  to the ``raw/`` and ``resolve/`` URLs of that branch); small text files (``groups.json``,
  ``classnames.txt``, ``{split}/nshards.txt``, ...) are fetched with ``requests`` and a
  timeout, and every failure is one :class:`DatasetError` naming the URL;
- shards are opened by :func:`open_shard`, a Python opener (``open`` for files,
  ``requests`` streaming for http(s)), inside our own webdataset pipeline
  (:func:`shard_pipeline`), so webdataset's ``gopen`` (curl, gsutil, shell) is never
  reached;
- ``--shard_pattern`` names shards with brace expansion (``{split}/shard-{000..011}.tar``,
  expanded by the ``braceexpand`` package, never by a shell);
- a webdataset ``pipe:`` URL (text run by ``sh -c``) is refused unless the user passes
  ``--allow_pipe_urls``; only then does :func:`open_shard` hand it to webdataset's own
  ``gopen_pipe``.  A ``pipe:`` root is always refused: a root is a directory, not a command.

Other URL schemes (``s3://``, ``gs://``, ``hf://``, ...) are refused rather than handed to a
command-line tool.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from .base import DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import requests
    import webdataset as wds

HTTP_SCHEMES = ("http", "https")
PIPE_PREFIX = "pipe:"
#: (connect, read) timeout in seconds of every http(s) request; a read timeout applies to
#: each read of a streamed shard, not to the whole download
HTTP_TIMEOUT = (15.0, 120.0)
ALLOW_PIPE_FLAG = "--allow_pipe_urls"
SHARD_PATTERN_FLAG = "--shard_pattern"
SPLIT_PLACEHOLDER = "{split}"
_HF_TREE = re.compile(r"^(https://huggingface\.co/datasets/[^/]+/[^/]+)/tree/(.+?)/*$")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a tar stream can raise on bad bytes or a dropped connection."""
    import requests
    import urllib3

    return (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, requests.RequestException,
            urllib3.exceptions.HTTPError)


def is_pipe(location: str | os.PathLike) -> bool:
    """True for webdataset ``pipe:`` URLs (a shell command)."""
    return os.fspath(location).lstrip().startswith(PIPE_PREFIX)


def is_url(location: str | os.PathLike) -> bool:
    """True for ``http://`` and ``https://`` URLs."""
    return urlparse(os.fspath(location)).scheme.lower() in HTTP_SCHEMES


def is_remote_root(location: str | os.PathLike) -> bool:
    """True for roots clip_benchmark would hand to a shell: URLs (it tests ``"://" in root``) and ``pipe:``."""
    text = os.fspath(location)
    return ("://" in text and not text.startswith("file://")) or is_pipe(text)


def refuse_pipe(location: str, what: str, allow: bool) -> None:
    """Raise unless ``location`` is not a ``pipe:`` URL or the user opted in."""
    if is_pipe(location) and not allow:
        raise DatasetError(
            f"{location}: {what} is a webdataset pipe: URL, which runs its text as a shell command; refused "
            f"(pass {ALLOW_PIPE_FLAG} to run it, only for a command you wrote or trust)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split(" @ ")[0]  # webdataset appends " @ <stream repr>"
    return text.splitlines()[0] if text else type(exc).__name__


def _local_path(location: str) -> str:
    """A local path for a plain path or a ``file://`` URL; DatasetError for other schemes."""
    parsed = urlparse(location)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return url2pathname(parsed.path)
    if len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise DatasetError(
            f"{location}: URL scheme {parsed.scheme!r} is not supported (use a local path, file://, http:// or https://)"
        )
    return location


# ------------------------------------------------------------------------ http(s)
def http_get(url: str, *, stream: bool = False, missing_ok: bool = False) -> requests.Response | None:
    """``requests.get`` with a timeout; DatasetError naming the URL on any failure.

    Returns None for a 404 when ``missing_ok``; redirects are followed (like ``curl -L``).
    """
    import requests

    try:
        response = requests.get(url, stream=stream, timeout=HTTP_TIMEOUT)
    except requests.RequestException as exc:
        raise DatasetError(f"{url}: cannot fetch ({type(exc).__name__}: {_first_line(exc)})") from None
    if response.status_code == 404 and missing_ok:
        response.close()
        return None
    if not response.ok:
        response.close()
        what = "file not found" if response.status_code == 404 else "request failed"
        raise DatasetError(f"{url}: {what} (HTTP {response.status_code} {response.reason})")
    return response


def http_identity(url: str) -> str:
    """What identifies a remote file's version for cache keys: its ETag, Last-Modified and size (HEAD).

    A server that sends neither ETag nor Last-Modified leaves only the URL and size, so
    a changed file of the same size goes unnoticed (use ``--no_feature_cache`` there).
    """
    import requests

    try:
        response = requests.head(url, allow_redirects=True, timeout=HTTP_TIMEOUT)
    except requests.RequestException as exc:
        raise DatasetError(f"{url}: cannot fetch ({type(exc).__name__}: {_first_line(exc)})") from None
    with response:
        if response.status_code == 404:
            raise DatasetError(f"{url}: shard not found (HTTP 404)")
        if not response.ok:
            raise DatasetError(f"{url}: request failed (HTTP {response.status_code} {response.reason})")
        headers = response.headers
        return f"{url}:{headers.get('ETag', '')}:{headers.get('Last-Modified', '')}:{headers.get('Content-Length', '')}"


# -------------------------------------------------------------------------- roots
@dataclass(frozen=True)
class DataRoot:
    """A dataset root: where its small text files and its shards live (directories or URL prefixes)."""

    location: str  # as the user gave it (messages, provenance)
    metadata_base: str
    shard_base: str

    @classmethod
    def parse(cls, root: str | os.PathLike) -> DataRoot:
        text = os.fspath(root)
        if is_pipe(text):
            raise DatasetError(
                f"{text}: a pipe: URL cannot be a dataset root (it is a shell command, not a directory); serve the "
                f"files over http(s), or keep the metadata local and name the shards with {SHARD_PATTERN_FLAG} "
                f"(pipe: shards need {ALLOW_PIPE_FLAG})"
            )
        if is_url(text):
            base = text.rstrip("/")
            hf = _HF_TREE.match(base)
            if hf:  # clip_benchmark's Hugging Face rule: text files from raw/, LFS shards from resolve/
                return cls(text, f"{hf[1]}/raw/{hf[2]}", f"{hf[1]}/resolve/{hf[2]}")
            return cls(text, base, base)
        path = _local_path(text)
        return cls(text, path, path)

    @property
    def remote(self) -> bool:
        return is_url(self.metadata_base)

    def metadata(self, *parts: str) -> str:
        """Path or URL of a text file under the root (parts are joined with ``/``)."""
        return _join(self.metadata_base, parts, self.remote)

    def shard(self, *parts: str) -> str:
        """Path or URL of a shard under the root."""
        return _join(self.shard_base, parts, is_url(self.shard_base))

    def read_bytes(self, *parts: str, missing_ok: bool = False) -> bytes | None:
        """A file's bytes; None if it is missing and ``missing_ok``, else DatasetError naming it."""
        where = self.metadata(*parts)
        if self.remote:
            response = http_get(where, missing_ok=missing_ok)
            if response is None:
                return None
            with response:
                return response.content
        path = Path(where)
        if not path.is_file():
            if missing_ok:
                return None
            raise DatasetError(f"{where}: file not found")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{where}: unreadable ({exc.strerror or exc})") from None

    def read_text(self, *parts: str, missing_ok: bool = False) -> str | None:
        data = self.read_bytes(*parts, missing_ok=missing_ok)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{self.metadata(*parts)}: not UTF-8 text ({exc})") from None


def _join(base: str, parts: Iterable[str], url: bool) -> str:
    parts = [p for p in parts if p]
    if url:
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def shard_identity(location: str) -> str:
    """A string that changes when the shard changes (feature-cache keys).

    Local files: resolved path, size and modification time; http(s): see
    :func:`http_identity`; ``pipe:`` commands: the command text (what it streams is
    invisible, so changed data behind an unchanged command is not detected).
    """
    if is_pipe(location):
        return location
    if is_url(location):
        return http_identity(location)
    path = Path(_local_path(location))
    try:
        st = path.stat()
    except OSError as exc:
        raise DatasetError(f"{location}: shard unreadable ({exc.strerror or exc})") from None
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def expand_shard_pattern(root: DataRoot, pattern: str, split: str, allow_pipe: bool = False) -> list[str]:
    """The shards of ``split`` named by a ``--shard_pattern``, in expansion order.

    ``{split}`` is replaced by the split name, then braces are expanded by ``braceexpand``
    (``{0..7}``, ``{000..011}``, ``{a,b}``).  Results that are not absolute (no URL scheme,
    not an absolute path) are taken relative to the root's shard location.
    """
    refuse_pipe(pattern, SHARD_PATTERN_FLAG, allow_pipe)
    if SPLIT_PLACEHOLDER not in pattern:
        raise DatasetError(f"{SHARD_PATTERN_FLAG} {pattern!r}: must contain {SPLIT_PLACEHOLDER} (each split has its own shards)")
    try:
        from braceexpand import braceexpand

        names = list(braceexpand(pattern.replace(SPLIT_PLACEHOLDER, split)))
    except Exception as exc:  # noqa: BLE001 - braceexpand raises its own error type; re-raised as ours
        raise DatasetError(f"{SHARD_PATTERN_FLAG} {pattern!r}: bad brace pattern ({_first_line(exc)})") from None
    out = []
    for name in names:
        refuse_pipe(name, SHARD_PATTERN_FLAG, allow_pipe)
        absolute = is_pipe(name) or "://" in name or os.path.isabs(name)
        out.append(name if absolute else root.shard(name))
    if not out:
        raise DatasetError(f"{SHARD_PATTERN_FLAG} {pattern!r}: names no shards")
    return out


# ------------------------------------------------------------------------- shards
def open_shard(location: str, allow_pipe: bool = False) -> IO[bytes]:
    """A readable binary stream of one shard: a file, an http(s) response body, or (opt-in) a pipe."""
    if is_pipe(location):
        refuse_pipe(location, "shard", allow_pipe)
        from webdataset.gopen import gopen_pipe

        return gopen_pipe(location)  # runs the user's shell command: they passed --allow_pipe_urls
    if is_url(location):
        response = http_get(location, stream=True)
        response.raw.decode_content = True  # undo a Content-Encoding such as gzip
        return response.raw
    try:
        return open(_local_path(location), "rb")
    except OSError as exc:
        raise DatasetError(f"{location}: cannot open shard ({exc.strerror or exc})") from None


def open_shards(sources: Iterable[dict[str, Any]], allow_pipe: bool = False) -> Iterator[dict[str, Any]]:
    """Pipeline stage: ``{"url": ...}`` -> ``{"url": ..., "stream": ...}`` via :func:`open_shard`."""
    for source in sources:
        yield dict(source, stream=open_shard(source["url"], allow_pipe))


def read_tar_samples(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Pipeline stage: opened shards -> raw samples (files with the same key, grouped).

    Like webdataset's ``tar_file_expander`` + ``group_by_keys``, but every problem is a
    DatasetError naming the shard (a truncated or corrupt tar, a dropped connection, a
    sample key that appears twice in a shard) instead of a bare ``tarfile``/``ValueError``
    whose message names an in-memory stream.
    """
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    read_errors = _read_errors()
    for source in sources:
        url, stream = source["url"], source["stream"]
        sample: dict[str, Any] | None = None
        seen: set[str] = set()
        try:
            for member in tar_file_iterator(stream):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    if key in seen:
                        raise DatasetError(f"{url}: sample {key!r}: the key appears twice in the shard (duplicate key)")
                    seen.add(key)
                    sample = {"__key__": key, "__url__": url}
                suffix = suffix.lower()
                if suffix in sample:
                    raise DatasetError(f"{url}: sample {key!r}: duplicate entry {member['fname']!r} (duplicate key)")
                sample[suffix] = member["data"]
            if sample is not None:
                yield sample
        except read_errors as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"{url}: unreadable or truncated tar ({type(exc).__name__}: {_first_line(exc)})") from None
        finally:
            _close(stream, url)


def _close(stream: Any, url: str) -> None:
    try:
        stream.close()
    except _read_errors() as exc:  # a pipe: command that exited non-zero
        raise DatasetError(f"{url}: {_first_line(exc)}") from None


def shard_pipeline(urls: Iterable[str], allow_pipe: bool = False) -> wds.FluidWrapper:
    """A webdataset pipeline over ``urls`` (in order) yielding raw samples, with our opener.

    Each DataLoader worker reads distinct shards (``split_by_worker``); a worker with
    no shard yields nothing (so more workers than shards is fine).  No shuffling.
    """
    import functools

    import webdataset as wds

    urls = list(urls)
    for url in urls:
        refuse_pipe(url, "shard", allow_pipe)
    return (
        wds.FluidWrapper(wds.SimpleShardList(urls))
        .compose(wds.split_by_worker)
        .compose(functools.partial(open_shards, allow_pipe=allow_pipe))
        .compose(read_tar_samples)
    )
