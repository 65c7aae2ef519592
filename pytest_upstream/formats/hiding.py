"""Releases a proxy's policy keeps out, taken out of metadata (docs/rules.md).

A blocked or too-new release must *vanish* from the metadata a resolver reads (a PyPI project
page, an npm packument and its dist-tags, maven-metadata.xml, a docker tag list), so that pip,
npm, Maven or skopeo pick an allowed release instead of failing on a 403.  Each format walks its
own document and asks ``Hiding.keep`` about every release in it; ``Hiding`` collects what was
hidden and why (for the served records, the lock and the report) and the earliest moment a
cooldown ends for one of them (``visible_at``), after which the rendering is out of date.
A direct request for a hidden release gets ``refused``: a 403 that names the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_upstream.config.release_policy import ReleasePolicy, TooNew
from pytest_upstream.config.rules import Refusal
from pytest_upstream.formats.base import FormatError

REFUSED_STATUS = 403


@dataclass(frozen=True)
class Hidden:
    name: str
    version: str
    reason: str


@dataclass
class Hiding:
    """One pass over a document with a policy at a time ``now``."""

    policy: ReleasePolicy
    now: float
    _hidden: dict[tuple[str, str], Hidden] = field(default_factory=dict)
    visible_at: float | None = None

    @property
    def hidden(self) -> list[Hidden]:
        """What was hidden, once per release (a PyPI release has many files), in order."""
        return list(self._hidden.values())

    def keep(self, name: str, version: str | None, uploaded: float | None) -> bool:
        refusal = self.policy.refusal(name, version, uploaded, self.now)
        if refusal is None:
            return True
        self._hidden.setdefault((name, version or ""), Hidden(name, version or "", str(refusal)))
        ends = refusal.visible_at if isinstance(refusal, TooNew) else None
        if ends is not None and (self.visible_at is None or ends < self.visible_at):
            self.visible_at = ends
        return False


def refused(what: str, refusal: Refusal | TooNew) -> FormatError:
    """The 403 for a direct request of a hidden release: the status line and body say why."""
    return FormatError(REFUSED_STATUS, f"{what} is {_phrase(refusal)}")


def _phrase(refusal: Refusal | TooNew) -> str:
    if isinstance(refusal, TooNew):
        return f"held back: {refusal}"
    return str(refusal)


def hide_tags(doc: object, image: str, hiding: Hiding) -> object:
    """A docker tag list (``{"name": ..., "tags": [...]}``) without the tags kept out; anything
    else is returned as it is (the format's own check refuses a malformed list)."""
    if isinstance(doc, dict) and isinstance(doc.get("tags"), list):
        tags = [t for t in doc["tags"] if not isinstance(t, str) or hiding.keep(image, t, None)]
        return {**doc, "tags": tags}
    return doc
