"""Reaching an MLflow store: the tracking URI, a reachability check, a client, retries, paged searches, and the run
writes and reads the launch's writers share (a run's status, its params in batches, its metrics by step)."""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from fasweep.errors import UserError
from fasweep.faults import unreachable
from fasweep.runs.layout import MLFLOW_STATUS, Tag, TrialStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_BUDGET_S = float(os.environ.get("FASWEEP_TRACKING_RETRY_S", "600"))
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
_PERMANENT_CODES |= {"PERMISSION_DENIED", "UNAUTHENTICATED"}
PAGE = 1000


class TrackingError(UserError):
    """The tracking store stayed unreachable past the retry budget; nothing was dropped silently."""


def resolve_tracking_uri(flag: str | None = None) -> str:
    """Tracking URI precedence: `--tracking-uri` > `$MLFLOW_TRACKING_URI` > `sqlite:///<cwd>/mlflow.db`."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}  # a store URI's default port by scheme
SQLITE_HEADER = b"SQLite format 3\x00"  # the first bytes of every SQLite database file


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise a one-line UserError unless the tracking store at `uri` answers within about `timeout_s`: a server's
    address is probed first and an SQLite path checked on disk, so a bad one fails in seconds, not after a client
    library's minutes of retries."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    fix = "start the store or pass a reachable --tracking-uri (or set MLFLOW_TRACKING_URI)"
    if scheme == "sqlite":
        fix = "pass --tracking-uri sqlite:///PATH/mlflow.db, a database file in a writable folder"
    try:
        if scheme in _PORTS and parsed.hostname and not _proxied(uri):
            reason = unreachable(parsed.hostname, parsed.port or _PORTS[scheme], timeout_s)
            if reason:
                raise ConnectionError(reason)
        if scheme in ("http", "https"):
            import requests

            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            if response.status_code >= 500:
                raise ConnectionError(f"HTTP {response.status_code}")
        elif scheme == "sqlite":
            _check_sqlite(Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri[9:]))
        elif scheme in ("postgresql", "mysql"):
            _check_database(uri, timeout_s)
        elif scheme in ("", "file"):
            root = Path(parsed.path if scheme else uri)
            if not root.parent.is_dir():
                raise ConnectionError(f"directory {root.parent} does not exist")
        _with_few_http_retries(lambda: client(uri).search_experiments(max_results=1))
    except UserError:
        raise
    except Exception as exc:
        raise UserError.field("tracking URI", uri, f"a reachable MLflow store ({reason_of(exc)}); {fix}") from None


def _proxied(uri: str) -> bool:
    """Whether requests would reach `uri` through a proxy (then the proxy, not this machine, connects to it)."""
    import requests

    return bool(requests.utils.get_environ_proxies(uri))


def _check_sqlite(db: Path) -> None:
    """An SQLite store's file: in a writable folder, and if it exists a writable SQLite database (an empty file
    becomes one); SQLAlchemy would retry anything else for minutes."""
    if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
        raise ConnectionError(f"directory {db.parent} does not exist or is not writable")
    if db.is_dir():
        raise ConnectionError(f"{db} is a directory, not an SQLite database file")
    if not db.exists():
        return
    if not db.is_file():
        raise ConnectionError(f"{db} is not a regular file")
    with db.open("rb") as fh:
        head = fh.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise ConnectionError(f"{db} is not an SQLite database")
    if not os.access(db, os.W_OK):  # MLflow would retry its writes for minutes
        raise ConnectionError(f"{db} is read-only")


def reason_of(exc: BaseException, limit: int = 200) -> str:
    """Why an error happened, in a few words: the innermost OS error's text (`Connection refused`) where the
    exception wraps one (requests, urllib3, SQLAlchemy), else its first line, shortened at a word."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        inner = getattr(current, "reason", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__ or current.__context__
    oserror = next((e for e in reversed(seen) if isinstance(e, OSError) and e.strerror), None)
    if oserror is not None:
        return str(oserror.strerror)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _check_database(uri: str, timeout_s: float) -> None:
    """Open one connection to a SQL backend store with a connect timeout (MLflow itself retries for minutes)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, int(timeout_s))})
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def _with_few_http_retries(fn: Callable[[], T]) -> T:
    """Run `fn` with MLflow's own HTTP retries turned down (our retry loop is the policy)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        return fn()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(uri: str) -> Any:
    """An MlflowClient for `uri` (mlflow imported on first use)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _permanent(exc: BaseException) -> bool:
    """True for errors a retry cannot fix (bad request, conflicting param), False for outages."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_CODES


def retry(fn: Callable[[], T], what: str, budget_s: float = RETRY_BUDGET_S, uri: str = "") -> T:
    """Call `fn` until it succeeds, backing off 0.5 s .. 30 s for at most `budget_s`; then raise TrackingError."""
    deadline = time.monotonic() + budget_s
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:
            if _permanent(exc) or time.monotonic() + delay > deadline:
                reason = reason_of(exc)
                raise TrackingError(
                    f"MLflow store {uri or '?'}: {what} failed for {budget_s:.0f}s ({reason}); results are kept in "
                    "the Ray Tune storage: bring the store back and run `fasweep launch SPEC --resume`"
                ) from exc
            log.warning("MLflow %s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def quote(value: str) -> str:
    """`value` as a quoted string literal of an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def search_all(mlflow: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """All runs matching `filter_string` in `experiment_ids` (every page)."""
    runs: list = []
    token = None
    while True:
        page = mlflow.search_runs(experiment_ids, filter_string, max_results=PAGE, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def all_experiment_ids(mlflow: Any) -> list[str]:
    """The ids of every active experiment in the store (every page)."""
    ids: list[str] = []
    token: str | None = None
    while True:
        page = mlflow.search_experiments(max_results=PAGE, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def set_status(mlflow: Any, run_id: str, status: str, extra: dict[str, str] | None = None) -> None:
    """Set a run's status tag (and `extra` tags), and its MLflow status accordingly."""
    from mlflow.entities import RunTag

    tags = {str(Tag.STATUS): str(status), **(extra or {})}
    mlflow.log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])
    if status == TrialStatus.RUNNING:
        mlflow.update_run(run_id, status="RUNNING")
    else:
        mlflow.set_terminated(run_id, status=MLFLOW_STATUS[status])


def log_params(mlflow: Any, run_id: str, params: dict[str, str]) -> None:
    """Log `params` on a run, 100 per batch."""
    from mlflow.entities import Param

    batch = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(batch), 100):
        mlflow.log_batch(run_id, params=batch[i : i + 100])


def metric_history(mlflow: Any, run_id: str, keys: Iterable[str]) -> dict[int, dict[str, float]]:
    """A run's logged metrics `keys` by step."""
    history: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in mlflow.get_metric_history(run_id, key):
            history.setdefault(m.step, {})[key] = m.value
    return history
