"""LiteLLM proxy callback: reports every successful call's token usage to user-metadata-auth.

user-metadata-auth (SPEC section 9) prices the tokens with the entry's prices, adds them to the
consumer's usage (GET /api/usage) and enforces the entry's token and cost budgets at /auth. This
callback sends it one native record per successful LLM call, in batches, to POST /usage:

    {"request_id": "<LiteLLM's call id>", "consumer": "<x-consumer-username>",
     "metadata_id": "<x-consumer-id>", "time": "<the call's start, RFC 3339>",
     "usage": {"prompt_tokens": 14, "completion_tokens": 21,
               "prompt_tokens_details": {"cached_tokens": 0}}}

The consumer and the entry are the X-Consumer-Username and X-Consumer-ID headers the gateway in
front of LiteLLM (nginx, Caddy, Traefik, Envoy or Kong with user-metadata-auth) set on the request
from the service's allow answer, replacing any client copy. LiteLLM must therefore be reachable only
through that gateway: a client that reached it directly could name another consumer.

Request ids must be made by the gateway or by LiteLLM, never taken from the client: the service
counts each request id once per consumer, so a client that could choose its ids could send one id
with every call and be billed once. LiteLLM's proxy takes a caller's `x-litellm-call-id` header as
the call id; when the original request carries that header, this callback uses an id of its own
instead (see request_id below). With USER_METADATA_AUTH_REQUEST_ID_HEADER set, the id is taken from
that header, which the gateway must set on every request, overwriting any client copy.

Setup (deploy/litellm/README.md): put this file next to LiteLLM's config.yaml and add
    litellm_settings:
      callbacks: uma_usage_callback.proxy_handler_instance

Environment (deliberately not UMA_ names: the service refuses unknown UMA_ variables, should it
share an environment with LiteLLM):
    USER_METADATA_AUTH_USAGE_URL    the service's /usage (default http://127.0.0.1:8089/usage)
    USER_METADATA_AUTH_USAGE_TOKEN  the service's usage.token (UMA_USAGE__TOKEN there); required
    USER_METADATA_AUTH_USAGE_BATCH  records per POST, 1-1000 (default 100)
    USER_METADATA_AUTH_USAGE_FLUSH_SECONDS  longest wait for a batch to fill (default 0.5)
    USER_METADATA_AUTH_USAGE_RETRY_SECONDS  how long a failed batch is retried (default 600)
    USER_METADATA_AUTH_USAGE_MAX_PENDING    records kept while the service is unreachable
                                            (default 100000; past it new records are dropped)
    USER_METADATA_AUTH_REQUEST_ID_HEADER    optional: take the request id from this header

A failed POST (no answer, a 5xx, 401/404 while the token or URL is being fixed) is retried with the
same records, so the same request ids: the service records each once. A 200 lists the records it
rejected, which are logged here and never retried. Only the Python standard library is used (the
POST runs in a worker thread), so nothing beyond LiteLLM needs installing.
"""

import asyncio
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone

from litellm.integrations.custom_logger import CustomLogger

logger = logging.getLogger("uma_usage_callback")


def _env_number(name, default, cast, low, high):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        logger.error("%s=%r is not a number; using %s", name, raw, default)
        return default
    if not low <= value <= high:
        logger.error("%s=%s is outside %s-%s; using %s", name, value, low, high, default)
        return default
    return value


URL = os.environ.get("USER_METADATA_AUTH_USAGE_URL", "http://127.0.0.1:8089/usage")
TOKEN = os.environ.get("USER_METADATA_AUTH_USAGE_TOKEN", "")
BATCH = _env_number("USER_METADATA_AUTH_USAGE_BATCH", 100, int, 1, 1000)
FLUSH_SECONDS = _env_number("USER_METADATA_AUTH_USAGE_FLUSH_SECONDS", 0.5, float, 0.0, 60.0)
RETRY_SECONDS = _env_number("USER_METADATA_AUTH_USAGE_RETRY_SECONDS", 600.0, float, 0.0, 3600.0)
MAX_PENDING = _env_number("USER_METADATA_AUTH_USAGE_MAX_PENDING", 100000, int, 1, 10000000)
REQUEST_ID_HEADER = os.environ.get("USER_METADATA_AUTH_REQUEST_ID_HEADER", "").strip().lower()
TIMEOUT_SECONDS = 5.0

# Statuses after which the same batch can never succeed: drop it (and say so) instead of retrying.
# 401 and 404 are retried: they mean the token or the URL is being set up, and the records are kept.
_FINAL_STATUSES = {400, 413, 415}


def _header(headers, name):
    """A request header by case-insensitive name (LiteLLM keeps Starlette's lower-case names)."""
    if not headers:
        return None
    try:
        items = headers.items()
    except AttributeError:
        return None
    for key, value in items:
        if isinstance(key, str) and key.lower() == name:
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            return value
    return None


def _request_headers(kwargs):
    """The headers of the request LiteLLM's proxy received (from the gateway)."""
    params = kwargs.get("litellm_params") or {}
    proxy_request = params.get("proxy_server_request") or {}
    headers = proxy_request.get("headers")
    if headers:
        return headers
    metadata = params.get("metadata") or {}
    return metadata.get("headers") or {}


def request_id(kwargs, headers):
    """The record's request id: made by LiteLLM (or the gateway), never chosen by the client."""
    if REQUEST_ID_HEADER:
        value = _header(headers, REQUEST_ID_HEADER)
        if value:
            return str(value)
        logger.warning("no %s header on a call: using an id of this callback's", REQUEST_ID_HEADER)
        return "litellm-cb-" + uuid.uuid4().hex
    call_id = kwargs.get("litellm_call_id") or (kwargs.get("standard_logging_object") or {}).get("id")
    if not call_id or _header(headers, "x-litellm-call-id") is not None:
        # The client chose LiteLLM's call id (x-litellm-call-id): a fresh id, so that every call
        # counts. (Strip x-litellm-call-id at the gateway to keep LiteLLM's own ids.)
        return "litellm-cb-" + uuid.uuid4().hex
    return str(call_id)


def _as_dict(value):
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    for method in ("model_dump", "dict"):
        dump = getattr(value, method, None)
        if callable(dump):
            try:
                dumped = dump()
            except Exception:  # noqa: BLE001 - any object LiteLLM hands over
                continue
            if isinstance(dumped, dict):
                return dumped
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return {}


def _count(value):
    """A token count as the service takes it: a non-negative integer, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def usage_object(kwargs, response_obj):
    """The call's usage in OpenAI shape, as LiteLLM reports it for every provider.

    LiteLLM's prompt_tokens already include cached input (and, for Anthropic, cache reads and,
    in recent versions, cache writes), so only the OpenAI fields are sent: sending Anthropic's
    cache_*_input_tokens as well would count them twice.
    """
    if isinstance(response_obj, dict):
        usage = _as_dict(response_obj.get("usage"))
    else:
        usage = _as_dict(getattr(response_obj, "usage", None))
    standard = kwargs.get("standard_logging_object") or {}
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    if prompt is None:
        prompt = _count(standard.get("prompt_tokens"))
    if completion is None:
        completion = _count(standard.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    out = {"prompt_tokens": prompt, "completion_tokens": completion}
    cached = _count(_as_dict(usage.get("prompt_tokens_details")).get("cached_tokens"))
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def _rfc3339(kwargs, start_time):
    standard = kwargs.get("standard_logging_object") or {}
    started = standard.get("startTime")
    if isinstance(started, (int, float)) and not isinstance(started, bool) and started > 0:
        moment = datetime.fromtimestamp(started, tz=timezone.utc)
    elif isinstance(start_time, datetime):
        # LiteLLM's start_time is datetime.now(): local time without a zone.
        moment = start_time.astimezone(timezone.utc)
    else:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def usage_record(kwargs, response_obj, start_time):
    """The native /usage record of one successful call, or None when there is nothing to bill."""
    if kwargs.get("cache_hit"):
        return None  # answered from LiteLLM's own cache: no provider tokens were used
    headers = _request_headers(kwargs)
    consumer = _header(headers, "x-consumer-username")
    entry = _header(headers, "x-consumer-id")
    if not consumer or not entry:
        logger.warning(
            "a call without X-Consumer-Username/X-Consumer-ID (not through the gateway?): not recorded"
        )
        return None
    usage = usage_object(kwargs, response_obj)
    if usage is None:
        logger.warning("a call without token counts: not recorded")
        return None
    record = {
        "request_id": request_id(kwargs, headers),
        "consumer": str(consumer),
        "metadata_id": str(entry),
        "usage": usage,
    }
    moment = _rfc3339(kwargs, start_time)
    if moment is not None:
        record["time"] = moment
    return record


class UsageShipper:
    """Batches records and POSTs them to /usage, retrying a failed batch with the same records."""

    def __init__(self, url=URL, token=TOKEN, batch=BATCH, flush_seconds=FLUSH_SECONDS,
                 retry_seconds=RETRY_SECONDS, max_pending=MAX_PENDING):
        self.url = url
        self.token = token
        self.batch = batch
        self.flush_seconds = flush_seconds
        self.retry_seconds = retry_seconds
        self.max_pending = max_pending
        self.pending = []
        self.dropped = 0
        self._task = None
        self._full = None
        if not token:
            logger.error("USER_METADATA_AUTH_USAGE_TOKEN is not set: /usage will answer 401")

    def add(self, record):
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            logger.error("usage records dropped: %d pending already (%d dropped in all)",
                         len(self.pending), self.dropped)
            return
        self.pending.append(record)
        if self._task is None or self._task.done():
            self._full = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif len(self.pending) >= self.batch:
            self._full.set()

    async def flush(self):
        """Sends everything pending (for shutdown hooks and tests)."""
        while self.pending or (self._task is not None and not self._task.done()):
            if self._task is None or self._task.done():
                self._full = asyncio.Event()
                self._task = asyncio.get_running_loop().create_task(self._run())
            self._full.set()
            await asyncio.shield(self._task)

    async def _run(self):
        while self.pending:
            if len(self.pending) < self.batch and self.flush_seconds > 0:
                try:
                    await asyncio.wait_for(self._full.wait(), self.flush_seconds)
                except asyncio.TimeoutError:
                    pass
            self._full.clear()
            batch = self.pending[: self.batch]
            del self.pending[: self.batch]
            await self._send(batch)

    def _post(self, body):
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": "Bearer " + self.token},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    async def _send(self, batch):
        body = json.dumps(batch, separators=(",", ":")).encode()
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                status, answer = await asyncio.to_thread(self._post, body)
            except Exception as error:  # noqa: BLE001 - refused, reset, timed out...
                status, answer = None, str(error).encode()
            if status == 200:
                self._report(batch, answer)
                return
            if status in _FINAL_STATUSES:
                logger.error("/usage refused a batch of %d with %s, dropped: %s",
                             len(batch), status, answer[:500])
                return
            if time.monotonic() >= deadline:
                logger.error("/usage failed for %.0f s (last: %s %s): %d records dropped",
                             self.retry_seconds, status, answer[:200], len(batch))
                return
            logger.warning("/usage answered %s (%s); retrying in %.1f s",
                           status, answer[:200], delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    @staticmethod
    def _report(batch, answer):
        try:
            outcome = json.loads(answer)
        except ValueError:
            return
        for rejected in outcome.get("rejected") or []:
            index = rejected.get("index")
            record = batch[index] if isinstance(index, int) and 0 <= index < len(batch) else None
            logger.warning("/usage rejected %s: %s",
                           record and record.get("request_id"), rejected.get("reason"))


class UmaUsageCallback(CustomLogger):
    """LiteLLM CustomLogger: one usage record per successful call."""

    def __init__(self, shipper=None, **kwargs):
        super().__init__(**kwargs)
        self.shipper = shipper or UsageShipper()

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        try:
            record = usage_record(kwargs, response_obj, start_time)
            if record is not None:
                self.shipper.add(record)
        except Exception:  # noqa: BLE001 - a logging callback must never fail the call
            logger.exception("could not record a call's usage")


proxy_handler_instance = UmaUsageCallback()
