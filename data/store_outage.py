"""An object store that stops answering during a run: the run goes on from its local copy.

``data.mirror.ObjectStoreMirror`` sends every request through its ``StoreOutage``. The first one
that finds the endpoint away (refused, or no answer within the client's timeout:
``request_timeout_s``) logs one warning and starts a prober thread that asks the
store every ``PROBE_INTERVAL_S`` whether it answers again. Until then no request is sent: what the
run commits (checkpoints, units, the export, shared files) is kept in the local copy, in the
order its uploads found the store away, as an outbox, whose list is kept in ``OUTBOX_DIR`` too; reads use the local copy. Once the store answers, the prober publishes
what was kept, oldest first (what the run deleted meanwhile, such as pruned checkpoints, is
skipped), and says so.

Waits are bounded and say what they wait for: a request still unanswered halfway to its timeout
is logged with what it is; a barrier that needs the store (``ObjectStoreMirror.wait_for_uploads``:
before a stage's record is shared) waits at most ``$GPTFLOW_OBJECT_STORE_WAIT_S``, logging what it
waits for, then stops the run with one line (``ObjectStoreAwayError``) naming the endpoint, what is
kept locally, and how to continue: rerun the same command once the store answers. The rerun
publishes what the outbox lists as it starts (``ObjectStoreMirror.publish_what_earlier_runs_kept``)
and resumes training from the newest kept checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gptflow.data.commits import write_json_atomic
from gptflow.data.environment import number_from_environment
from gptflow.data.errors import UserError

REQUEST_TIMEOUT_ENV = "GPTFLOW_OBJECT_STORE_TIMEOUT_S"
DEFAULT_REQUEST_TIMEOUT_S = 20.0
"""How long an S3 request waits for an answer before botocore tries it once more, then gives up:
an endpoint that stops answering (paused, or its packets dropped) costs a request about three
times this (measured: 63 s for 20, 7 s for 2, with the retry and its back-off), instead of
botocore's 60 s times its and s3fs's retries (over two minutes of silence)."""
OUTBOX_DIR = "object-store-outbox"
"""In the local copy: one JSON list per process of what it keeps for the store (paths relative to
the copy), so that what a run stopped or killed during an outage kept is published by the next."""
WAIT_ENV = "GPTFLOW_OBJECT_STORE_WAIT_S"
DEFAULT_WAIT_S = 300.0
"""How long a barrier waits for an away object store to take what the run kept before it stops."""
PROBE_INTERVAL_S = 5.0
REPORT_EVERY_S = 30.0

_UNREACHABLE = {"ConnectionError", "HTTPClientError", "TimeoutError", "ClientConnectionError"}
"""Class names, anywhere in an error's MRO or cause chain, of a store that cannot be reached: the
builtin ``ConnectionError`` and ``TimeoutError``, botocore's ``ConnectionError`` (refused, connect
timeout) and ``HTTPClientError`` (read timeout, connection closed), aiohttp's
``ClientConnectionError``. Matched by name so the data layer imports no store client."""

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


class ObjectStoreAwayError(UserError):
    """The object store stayed away longer than a run may wait; the message says what is kept and how to go on."""


class StoreAway(Exception):
    """A request not sent, or not answered, because the store is away: the caller uses the local copy."""


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the store could not be reached (not that it refused the request)."""
    link: BaseException | None = error
    while link is not None:
        if any(cls.__name__ in _UNREACHABLE for cls in type(link).__mro__):
            return True
        link = link.__cause__ or link.__context__
    return False


def workspace_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem a workspace at ``url`` is reached through, and the path within it:
    one client per scheme and environment, as ``data.object_sources.object_store_filesystem``'s
    (whose clients read corpora), with every S3 request bounded by ``request_timeout_s``."""
    scheme = url.split("://", 1)[0]
    environment = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith(_CLIENT_SETTINGS)))
    filesystem = _bounded_client(scheme, environment)
    return filesystem, filesystem._strip_protocol(url)


_CLIENT_SETTINGS = ("AWS_", "FSSPEC_", REQUEST_TIMEOUT_ENV)
"""The environment a workspace's client reads when it is made: endpoint, credentials, its timeout."""


@functools.lru_cache(maxsize=16)
def _bounded_client(scheme: str, environment: tuple[tuple[str, str], ...]) -> Any:
    import fsspec  # a dependency of datasets; only object stores need it

    if scheme not in ("s3", "s3a"):
        return fsspec.filesystem(scheme, use_listings_cache=False, skip_instance_cache=True)
    timeout_s = request_timeout_s()
    filesystem = fsspec.filesystem(scheme, use_listings_cache=False, skip_instance_cache=True, config_kwargs={
        "connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 2, "mode": "standard"}})
    filesystem.retries = 1  # s3fs would retry each of botocore's attempts five times more
    return filesystem


def request_timeout_s() -> float:
    """``$GPTFLOW_OBJECT_STORE_TIMEOUT_S`` (default 20): how long one request to a workspace's store waits for an answer."""
    return number_from_environment(
        REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT_S, zero_allowed=False,
        wanted="a number of seconds: give how long a request to a workspace's object store may wait for an answer, "
        "e.g. 20")


def wait_limit_s() -> float:
    """``$GPTFLOW_OBJECT_STORE_WAIT_S`` (default 300)."""
    return number_from_environment(
        WAIT_ENV, DEFAULT_WAIT_S, zero_allowed=True,
        wanted="a number of seconds: give how long a run waits for an object store that stopped answering, e.g. 300")


class StoreOutage:
    """Whether the object store ``endpoint`` answers, and what ``local_root`` keeps for it meanwhile.

    ``probe`` is a cheap request that raises while the store is away; ``publish`` puts one kept
    path (a committed directory or a shared file) in the store."""

    def __init__(self, endpoint: str, local_root: Path, probe: Callable[[], object],
                 publish: Callable[[Path], None]) -> None:
        self.endpoint = endpoint
        self.local_root = local_root
        self._probe = probe
        self._publish = publish
        self._kept: dict[Path, None] = {}  # an ordered set: published oldest first
        self._outbox = local_root / OUTBOX_DIR / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self._away_since: float | None = None
        self._changed = threading.Condition()

    @property
    def away(self) -> bool:
        return self._away_since is not None

    def request(self, what: str, call: Callable[[], Result]) -> Result:
        """``call()``'s answer from the store; ``StoreAway`` at once while it is away, or once
        ``call`` finds it away. ``what`` names the request in the line logged if it is slow."""
        if self.away:
            raise StoreAway(self.endpoint)
        # Logged halfway to the request's timeout, so an endpoint that stopped answering is never silent.
        slow = threading.Timer(request_timeout_s() / 2, lambda: logger.warning(
            f"Waiting for the object store at {self.endpoint} to answer ({what}); a request gives up after "
            f"about three times {request_timeout_s():.0f} s ({REQUEST_TIMEOUT_ENV})."))
        slow.daemon = True
        slow.start()
        try:
            return call()
        except Exception as error:
            if not is_unreachable(error):
                raise
            self.went_away(error)
            raise StoreAway(self.endpoint) from error
        finally:
            slow.cancel()

    def keep_if_away(self, path: Path) -> bool:
        """While the store is away, keep the committed ``path`` locally until it answers, then
        publish it; False when the store answers (the caller publishes ``path`` itself)."""
        with self._changed:
            if self._away_since is None:
                return False
            self._kept[Path(path)] = None
            self._save()
            return True

    def is_kept(self, path: Path) -> bool:
        """Whether ``path`` waits to be published: its local copy is newer than the store's."""
        with self._changed:
            return Path(path) in self._kept

    def went_away(self, error: BaseException) -> None:
        """Note that a request found the store away: warn once, and start probing for its return."""
        with self._changed:
            if self._away_since is not None:
                return
            self._away_since = time.monotonic()
        logger.warning(f"The object store at {self.endpoint} does not answer ({type(error).__name__}): the run goes "
                       f"on, keeping what it writes in {self.local_root} and publishing it once the store answers "
                       "again.")
        threading.Thread(target=self._await_return, name="gptflow-store-probe", daemon=True).start()

    def wait_until_published(self) -> None:
        """Return once nothing is kept; raise ``ObjectStoreAwayError`` after ``wait_limit_s``."""
        limit_s = wait_limit_s()
        deadline = time.monotonic() + limit_s
        next_report = 0.0
        with self._changed:
            while self._kept:
                now = time.monotonic()
                if now >= deadline:
                    raise ObjectStoreAwayError(self._stop_message(limit_s))
                if now >= next_report:
                    logger.warning(f"Waiting up to {deadline - now:.0f} s for the object store at {self.endpoint} to "
                                   f"take what the run kept: {self._kept_summary()}.")
                    next_report = now + REPORT_EVERY_S
                self._changed.wait(min(deadline - now, REPORT_EVERY_S, PROBE_INTERVAL_S))

    def kept_summary(self) -> str | None:
        """What is kept for the store, in a few words; None when nothing is."""
        with self._changed:
            return self._kept_summary() if self._kept else None

    def _kept_summary(self) -> str:
        names = [path.relative_to(self.local_root).as_posix() for path in self._kept]
        named = ", ".join(names if len(names) <= 4 else [names[0], "...", *names[-3:]])
        return f"{len(names)} file(s) and folder(s) in {self.local_root} ({named})"

    def _stop_message(self, limit_s: float) -> str:
        return (f"The object store at {self.endpoint} did not answer within {limit_s:.0f} s ({WAIT_ENV}): "
                f"{self._kept_summary()} are kept locally and not yet published. Rerun the same command once it "
                "answers: it publishes them and continues from them.")

    def _await_return(self) -> None:
        reported = ""
        while True:
            time.sleep(PROBE_INTERVAL_S)
            try:
                self._probe()
            except Exception as error:  # the store's own errors differ by client; an unreachable one is expected
                answer = f"{type(error).__name__}: {error}"
                if not is_unreachable(error) and answer != reported:
                    logger.warning(f"The object store at {self.endpoint} answers, with an error ({answer}): "
                                   f"what the run kept stays in {self.local_root}; asking again every "
                                   f"{PROBE_INTERVAL_S:.0f} s.")
                    reported = answer
                continue
            break
        with self._changed:
            away_s = time.monotonic() - (self._away_since or time.monotonic())
            self._away_since = None
            count = len(self._kept)
        logger.warning(f"The object store at {self.endpoint} answers again after {away_s:.0f} s: publishing the "
                       f"{count} file(s) and folder(s) kept meanwhile.")
        self._publish_kept()

    def _publish_kept(self) -> None:
        while True:
            with self._changed:
                if not self._kept:
                    self._changed.notify_all()
                    return
                path = next(iter(self._kept))
            try:
                if path.exists():  # else deleted meanwhile (a pruned checkpoint): nothing to publish
                    self._publish(path)
            except Exception as error:
                if is_unreachable(error):
                    self.went_away(error)
                    return
                logger.warning(f"{path} could not be published to the object store at {self.endpoint} "
                               f"({type(error).__name__}: {error}); the next run that uses it publishes it.")
            with self._changed:
                self._kept.pop(path, None)
                self._save()
                self._changed.notify_all()

    def _save(self) -> None:
        """Write the outbox's list (under ``_changed``); no file once nothing is kept."""
        if self._kept:
            write_json_atomic(self._outbox, [path.relative_to(self.local_root).as_posix() for path in self._kept])
        else:
            self._outbox.unlink(missing_ok=True)
