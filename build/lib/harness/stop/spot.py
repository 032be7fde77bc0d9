"""Cloud preemption notices: poll the instance metadata service and set the stop flag once seen.

One provider per poller, chosen by ``preempt.spot``:

- ``aws``: IMDSv2 first (PUT a session token, send it with every GET), IMDSv1 plain GETs only when
  the token call is refused; the notice is ``spot/instance-action`` (404 until one exists).
- ``gcp``: ``instance/preempted`` with ``Metadata-Flavor: Google``; ``TRUE`` once preempted.
  ``instance/maintenance-event`` is deliberately not polled: a live migration is not a preemption.
- ``azure``: Scheduled Events with ``Metadata: true``; only an event of type ``Preempt`` counts
  (Reboot, Redeploy, Freeze and Terminate are not spot evictions). Events are never acknowledged,
  so the platform keeps its full notice period.

Requests go straight to the metadata host, never through ``http_proxy``: a proxy cannot reach the
link-local address, and AWS refuses token requests that carry ``X-Forwarded-For``.
An unreachable or misbehaving endpoint means "no notice": the poller keeps polling and logs one
warning per outage, not one per poll.
"""

from __future__ import annotations

import enum
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from harness.stop.flag import REASON_SPOT, StopFlag

log = logging.getLogger("harness")

PROVIDERS = ("aws", "gcp", "azure")
SPOT_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "azure": "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
}

REQUEST_TIMEOUT_S = 1.0  # the metadata service is link-local: a slower answer is an outage
MAX_BODY_BYTES = 64 * 1024  # notices are tiny; never buffer a misbehaving server's stream

AWS_TOKEN_PATH = "/latest/api/token"
AWS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
AWS_TOKEN_TTL_S = 21600  # the maximum IMDS allows: one PUT per six hours
AWS_TOKEN_RENEW_FRACTION = 0.9  # renew once 90% of the TTL has passed, well before IMDS expires it
# Token PUT answers that mean "this IMDS does not do v2" (or a proxy in the way refuses PUT): only
# these switch to IMDSv1. 501 is what a server without PUT (http.server, some proxies) answers.
# A network error or a 5xx outage is not a refusal.
AWS_TOKEN_REFUSED = frozenset({403, 404, 405, 501})
AWS_NOTICE_ACTIONS = frozenset({"terminate", "stop", "hibernate"})

GCP_HEADERS = {"Metadata-Flavor": "Google"}
AZURE_HEADERS = {"Metadata": "true"}
AZURE_PREEMPT = "Preempt"

HTTP_OK = 200
HTTP_UNAUTHORIZED = 401
HTTP_NOT_FOUND = 404


class Verdict(enum.Enum):
    """What one answer of the notice endpoint says."""

    NOTICE = "notice"
    NO_NOTICE = "no notice"
    UNEXPECTED = "unexpected"  # a status or body the provider does not document: logged once


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, whatever its status."""

    url: str
    status: int
    body: bytes


class NoticeSource(Protocol):
    """Reads the provider's notice endpoint once.

    ``read`` returns the answer for any HTTP status and raises OSError or
    http.client.HTTPException when the endpoint cannot be reached or does not speak HTTP.
    """

    url: str

    def read(self) -> Answer: ...


def _fetch(url: str, method: str = "GET", headers: Optional[dict[str, str]] = None) -> Answer:
    """One request without proxies and with REQUEST_TIMEOUT_S.

    HTTP error statuses come back as an Answer; network failures raise (see NoticeSource).
    """
    request = urllib.request.Request(url, method=method, headers=headers or {})
    # An empty ProxyHandler disables http_proxy/https_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=REQUEST_TIMEOUT_S) as response:
            return Answer(url, response.status, response.read(MAX_BODY_BYTES))
    except urllib.error.HTTPError as error:
        with error:
            return Answer(url, error.code, error.read(MAX_BODY_BYTES))


def origin(url: str) -> str:
    """``scheme://host[:port]`` of an absolute http(s) URL; ValueError for anything else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"preempt.spot_url={url!r} is not an absolute http(s) URL. "
                         "HINT: give the full notice URL, e.g. " + SPOT_URLS["aws"])
    return f"{parts.scheme}://{parts.netloc}"


class AwsNoticeSource:
    """IMDSv2 with a cached session token, falling back to IMDSv1 when the token call is refused.

    The token is renewed after AWS_TOKEN_RENEW_FRACTION of its TTL and whenever a GET answers 401
    (IMDS restarted, or the token was revoked). The v1 fallback is kept until a plain GET answers
    401, which means v2 was made mandatory since: then tokens are tried again.
    """

    def __init__(self, url: str, token_ttl_s: int = AWS_TOKEN_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.url = url
        self.token_url = origin(url) + AWS_TOKEN_PATH
        self.token_ttl_s = token_ttl_s
        self._clock = clock
        self._token: Optional[str] = None
        self._renew_at = 0.0
        self._v1 = False

    def read(self) -> Answer:
        if self._v1:
            answer = _fetch(self.url)
            if answer.status != HTTP_UNAUTHORIZED:
                return answer
            self._v1 = False  # v2 became mandatory: try tokens again
        answer = self._read_with_token()
        if answer.status == HTTP_UNAUTHORIZED and self._token is not None:
            self._token = None  # revoked or expired early (IMDS restarted): one fresh token, one retry
            answer = self._read_with_token()
        return answer

    def _read_with_token(self) -> Answer:
        """GET with a valid token; a plain GET if the token call is refused; else the PUT's answer."""
        refusal = self._ensure_token()
        if refusal is not None:
            return refusal
        headers = {} if self._token is None else {AWS_TOKEN_HEADER: self._token}  # None: IMDSv1
        return _fetch(self.url, headers=headers)

    def _ensure_token(self) -> Optional[Answer]:
        """Get a token if none is valid. Returns the token call's answer only when it is unexpected."""
        if self._token is not None and self._clock() < self._renew_at:
            return None
        requested_at = self._clock()
        answer = _fetch(self.token_url, method="PUT",
                        headers={AWS_TOKEN_TTL_HEADER: str(self.token_ttl_s)})
        if answer.status in AWS_TOKEN_REFUSED:
            log.info("IMDSv2 token refused (%d) at %s: using IMDSv1", answer.status, self.token_url)
            self._token, self._v1 = None, True
            return None
        token = answer.body.decode(errors="replace").strip()
        if answer.status != HTTP_OK or not token:
            return answer
        self._token = token
        self._renew_at = requested_at + AWS_TOKEN_RENEW_FRACTION * self.token_ttl_s
        return None


class HeaderNoticeSource:
    """A plain GET with fixed headers (GCP, Azure)."""

    def __init__(self, url: str, headers: dict[str, str]):
        origin(url)  # validate early, in the caller's thread
        self.url = url
        self.headers = dict(headers)

    def read(self) -> Answer:
        return _fetch(self.url, headers=self.headers)


def notice_source(provider: str, url: Optional[str]) -> NoticeSource:
    """The source for ``provider`` at ``url`` (None: the provider's metadata URL).

    ValueError names the bad value when the provider is unknown or the URL is not absolute http(s).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"preempt.spot={provider!r} is not a known provider. "
                         f"HINT: use one of {PROVIDERS}, or null to not poll")
    url = url or SPOT_URLS[provider]
    if provider == "aws":
        return AwsNoticeSource(url)
    return HeaderNoticeSource(url, GCP_HEADERS if provider == "gcp" else AZURE_HEADERS)


def _json_object(body: bytes) -> Optional[dict]:
    try:
        value = json.loads(body.decode(errors="replace"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _aws_verdict(status: int, body: bytes) -> Verdict:
    if status == HTTP_NOT_FOUND:
        return Verdict.NO_NOTICE
    document = _json_object(body) if status == HTTP_OK else None
    if document is None or document.get("action") not in AWS_NOTICE_ACTIONS:
        return Verdict.UNEXPECTED
    return Verdict.NOTICE


def _gcp_verdict(status: int, body: bytes) -> Verdict:
    text = body.decode(errors="replace").strip().upper()
    if status != HTTP_OK or text not in ("TRUE", "FALSE"):
        return Verdict.UNEXPECTED
    return Verdict.NOTICE if text == "TRUE" else Verdict.NO_NOTICE


def _azure_verdict(status: int, body: bytes) -> Verdict:
    document = _json_object(body) if status == HTTP_OK else None
    events = document.get("Events") if document is not None else None
    if not isinstance(events, list):
        return Verdict.UNEXPECTED
    preempted = any(isinstance(event, dict) and event.get("EventType") == AZURE_PREEMPT
                    for event in events)
    return Verdict.NOTICE if preempted else Verdict.NO_NOTICE


_VERDICTS = {"aws": _aws_verdict, "gcp": _gcp_verdict, "azure": _azure_verdict}


def verdict(provider: str, body: bytes, status: int) -> Verdict:
    """What a notice endpoint's answer means. KeyError for a provider not in PROVIDERS."""
    return _VERDICTS[provider](status, body)


def notice_present(provider: str, body: bytes, status: int) -> bool:
    """Whether a metadata answer announces preemption (harness.preempt's former helper)."""
    return verdict(provider, body, status) is Verdict.NOTICE


class SpotPoller:
    """A daemon thread that polls a cloud preemption notice and requests a stop once one is seen.

    The constructor raises ValueError for an unknown provider or a malformed URL. Polling itself
    never raises: an outage or an unexpected answer counts as "no notice" and is logged once, until
    the endpoint answers as documented again.
    """

    def __init__(self, flag: StopFlag, provider: str, url: Optional[str], interval_s: float):
        self.flag = flag
        self.provider = provider
        self.source = notice_source(provider, url)
        self.url = self.source.url
        self.interval_s = interval_s
        self._failing = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-spot-poller", daemon=True)

    def start(self) -> "SpotPoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end; it does after the request in flight (at most a few timeouts)."""
        self._stopped.set()

    def poll_once(self) -> bool:
        """Read the notice once; True when one was seen and the flag was requested with REASON_SPOT."""
        if self._check() is not Verdict.NOTICE:
            return False
        log.warning("spot termination notice at %s: stopping at the next step", self.url)
        self.flag.request(REASON_SPOT)
        return True

    def _check(self) -> Verdict:
        try:
            answer = self.source.read()
        except (OSError, http.client.HTTPException) as error:
            self._report_failure(f"unreachable ({error})", self.url)
            return Verdict.UNEXPECTED
        result = verdict(self.provider, answer.body, answer.status)
        if result is Verdict.UNEXPECTED:
            self._report_failure(f"answered {answer.status} {answer.body[:200]!r}", answer.url)
        elif self._failing:
            self._failing = False
            log.info("spot notice endpoint %s answers again", self.url)
        return result

    def _report_failure(self, what: str, url: str) -> None:
        if self._failing:
            return  # one warning per outage, not one per poll
        self._failing = True
        log.warning("spot notice endpoint %s %s: a notice cannot be seen until it recovers; "
                    "still polling every %.1fs", url, what, self.interval_s)

    def _run(self) -> None:
        while not self._stopped.is_set():
            if self.poll_once():
                return
            self._stopped.wait(self.interval_s)
