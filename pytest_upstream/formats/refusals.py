"""A direct request for a release a proxy's policy keeps out: a 403 that says why.

The status line carries the reason too (pip and uv print only that): ``403 blocked by rule
'requests<2.31'``.  The metadata a resolver reads never lists such a release (hiding.py), so a
client asks for one only when told to by name: a pinned version, a lock file, a URL.
"""

from __future__ import annotations

from pytest_upstream.config.release_policy import ReleasePolicy, TooNew
from pytest_upstream.config.rules import Refusal
from pytest_upstream.formats.base import FormatError

REFUSED_STATUS = 403


def refused(what: str, refusal: Refusal | TooNew) -> FormatError:
    """The 403 for a direct request of a hidden release: the status line and body say why."""
    phrase = _phrase(refusal)
    return FormatError(REFUSED_STATUS, f"{what} is {phrase}", reason=phrase[:1].upper() + phrase[1:])


def _phrase(refusal: Refusal | TooNew) -> str:
    if isinstance(refusal, TooNew):
        return f"held back: {refusal}"
    return str(refusal)


def admit(
    policy: ReleasePolicy, now: float, name: str, version: str | None, uploaded: float | None, what: str
) -> None:
    """Raise the 403 for a direct request of a release ``policy`` keeps out (``what`` names it)."""
    if policy and (refusal := policy.refusal(name, version, uploaded, now)):
        raise refused(what, refusal)


def admit_project(policy: ReleasePolicy, name: str, what: str) -> None:
    """Raise the 403 for the metadata of a name ``policy`` keeps out as a whole."""
    if policy and (refusal := policy.project(name)):
        raise refused(what, refusal)
