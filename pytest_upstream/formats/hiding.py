"""Releases a proxy's policy keeps out, taken out of metadata (docs/rules.md).

A blocked or too-new release must *vanish* from the metadata a resolver reads (a PyPI project
page, an npm packument and its dist-tags, maven-metadata.xml, a docker tag list), so that pip,
npm, Maven or skopeo pick an allowed release instead of failing on a 403.  Each format walks its
own document and asks ``Hiding.keep`` about every release in it; ``Hiding`` collects what was
hidden and why (for the served records, the lock and the report) and the earliest moment a
cooldown ends for one of them (``visible_at``), after which the rendering is out of date.
A direct request for a hidden release is refused by ``refusals.py`` with a 403 naming the rule.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from pytest_upstream.config.maven_versions import version_key
from pytest_upstream.config.release_policy import ReleasePolicy, TooNew, parse_time


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


def hide_tags(doc: object, image: str, hiding: Hiding) -> object:
    """A docker tag list (``{"name": ..., "tags": [...]}``) without the tags kept out; anything
    else is returned as it is (the format's own check refuses a malformed list)."""
    if isinstance(doc, dict) and isinstance(doc.get("tags"), list):
        tags = [t for t in doc["tags"] if not isinstance(t, str) or hiding.keep(image, t, None)]
        return {**doc, "tags": tags}
    return doc


def hide_npm_versions(doc: dict[str, Any], hiding: Hiding) -> dict[str, Any]:
    """A packument (as ``formats/npm.py`` parsed it) without the versions kept out, in place.

    Their manifests and ``time`` entries go; a dist-tag that named one is moved: ``latest`` to
    the newest remaining release that is no newer than it was (else the newest remaining
    release, else the newest remaining prerelease), any other tag is dropped, as npm's own
    ``--before`` does with tags it cannot honour.
    """
    import nodesemver

    name = str(doc.get("name", doc.get("_id", "")))
    raw_times = doc.get("time")
    times: dict[str, Any] = raw_times if isinstance(raw_times, dict) else {}
    versions: dict[str, Any] = doc["versions"]
    for version in list(versions):
        if not hiding.keep(name, version, parse_time(times.get(version))):
            del versions[version]
            times.pop(version, None)
    tags = doc.get("dist-tags")
    if not isinstance(tags, dict):
        return doc
    valid = [v for v in versions if nodesemver.valid(v, loose=False)]
    for tag, target in list(tags.items()):
        if target in versions:
            continue
        del tags[tag]
        if tag != "latest" or not valid:
            continue
        releases = [v for v in valid if not nodesemver.make_semver(v, loose=False).prerelease]
        older = [
            v
            for v in releases
            if nodesemver.valid(target, loose=False) and nodesemver.lte(v, target, loose=False)
        ]
        pool = older or releases or valid
        tags["latest"] = max(
            pool, key=functools.cmp_to_key(lambda a, b: nodesemver.compare(a, b, loose=False))
        )
    return doc


def hide_maven_versions(body: bytes, name: str, hiding: Hiding) -> bytes:
    """A maven-metadata.xml (already checked safe: no DTD, UTF-8) without the versions kept out.

    ``name`` is ``group:artifact``.  Maven publishes one time, ``lastUpdated``, the moment the
    document last changed: it is taken as the publication time of ``<latest>`` only (usually the
    version deployed then); every other version's time is unknown.  ``<latest>`` and
    ``<release>`` move to the newest remaining version (``<release>``: not a SNAPSHOT).
    Returns ``body`` unchanged when nothing is hidden.
    """
    root = ET.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    versioning = root.find(f"{ns}versioning")
    listed = versioning.find(f"{ns}versions") if versioning is not None else None
    if versioning is None or listed is None:
        return body
    latest = versioning.findtext(f"{ns}latest")
    updated = parse_time(versioning.findtext(f"{ns}lastUpdated"))
    removed = False
    for element in list(listed.findall(f"{ns}version")):
        version = (element.text or "").strip()
        if not hiding.keep(name, version, updated if version == latest else None):
            listed.remove(element)
            removed = True
    if not removed:
        return body
    remaining = [(e.text or "").strip() for e in listed.findall(f"{ns}version")]
    for tag, pool in (
        ("latest", remaining),
        ("release", [v for v in remaining if not v.upper().endswith("-SNAPSHOT")]),
    ):
        pointer = versioning.find(f"{ns}{tag}")
        if pointer is None:
            continue
        if pool:
            pointer.text = max(pool, key=version_key)
        else:
            versioning.remove(pointer)
    if ns:  # written back as the default namespace it was (no global prefix registry)
        for element in root.iter():
            element.tag = element.tag.removeprefix(ns)
        root.set("xmlns", ns[1:-1])
    xml = ET.tostring(root, encoding="unicode")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + xml.encode()
