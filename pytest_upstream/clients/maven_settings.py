"""A Maven ``settings.xml`` that sends every repository request through the proxy.

Used by ``UpstreamProxy.maven_settings`` (the pytest fixture) and documented in
docs/maven.md.  The mirror (``mirrorOf *``) replaces every repository a build
names, including Maven's built-in ``central``; an always-active profile
redefines ``central`` with SNAPSHOTs enabled, because a mirror only serves
SNAPSHOTs when a repository it mirrors allows them.  ``extra`` repositories
(id -> proxy URL) are left out of the mirror and listed on their own, e.g. a
second proxy key in front of a SNAPSHOT repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

MIRROR_ID = "pytest-upstream"
PROFILE_ID = "pytest-upstream"


def _repository(tag: str, repo_id: str, url: str) -> str:
    return (
        f"        <{tag}>\n"
        f"          <id>{escape(repo_id)}</id>\n"
        f"          <url>{escape(url)}</url>\n"
        "          <releases><enabled>true</enabled></releases>\n"
        "          <snapshots><enabled>true</enabled></snapshots>\n"
        f"        </{tag}>\n"
    )


def settings_xml(
    mirror_url: str, local_repo: Path | None = None, extra: Mapping[str, str] | None = None
) -> str:
    """The text of a settings.xml mirroring everything (but ``extra``) to ``mirror_url``."""
    extra = dict(extra or {})
    mirror_of = ",".join(["*", *(f"!{repo_id}" for repo_id in extra)])
    # the URL of central is never used: the mirror replaces it
    repos = {"central": "http://central.invalid/", **extra}
    local = f"  <localRepository>{escape(str(local_repo))}</localRepository>\n" if local_repo else ""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0"\n'
        '          xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
        '          xsi:schemaLocation="http://maven.apache.org/SETTINGS/1.0.0 '
        'https://maven.apache.org/xsd/settings-1.0.0.xsd">\n'
        f"{local}"
        "  <mirrors>\n"
        "    <mirror>\n"
        f"      <id>{MIRROR_ID}</id>\n"
        f"      <mirrorOf>{escape(mirror_of)}</mirrorOf>\n"
        f"      <url>{escape(mirror_url)}</url>\n"
        "    </mirror>\n"
        "  </mirrors>\n"
        "  <profiles>\n"
        "    <profile>\n"
        f"      <id>{PROFILE_ID}</id>\n"
        "      <repositories>\n"
        + "".join(_repository("repository", i, u) for i, u in repos.items())
        + "      </repositories>\n"
        "      <pluginRepositories>\n"
        + "".join(_repository("pluginRepository", i, u) for i, u in repos.items())
        + "      </pluginRepositories>\n"
        "    </profile>\n"
        "  </profiles>\n"
        "  <activeProfiles>\n"
        f"    <activeProfile>{PROFILE_ID}</activeProfile>\n"
        "  </activeProfiles>\n"
        "</settings>\n"
    )
