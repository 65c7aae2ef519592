"""Real Maven peers for tests/test_maven.py: nginx as the upstream, mvn as the client.

nginx serves Debian's ``/usr/share/maven-repo`` (the plugins a tiny build
needs, installed by scripts/peers/maven.sh) and, on a second port, a WebDAV
directory that ``mvn deploy`` PUTs SNAPSHOTs into.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .peers import free_port, wait_http

MAVEN_REPO = Path("/usr/share/maven-repo")
INSTALL = "scripts/peers/maven.sh"
PEER_COMMANDS = ("mvn", "nginx", str(MAVEN_REPO / "org/apache/maven/plugins/maven-compiler-plugin"))

# The Debian packages' versions: the upstream (/usr/share/maven-repo) has no others.
PLUGINS = {
    "maven-resources-plugin": "3.3.0",
    "maven-compiler-plugin": "3.10.1",
    "maven-surefire-plugin": "2.22.3",
    "maven-jar-plugin": "3.3.0",
    "maven-install-plugin": "3.1.0",
    "maven-deploy-plugin": "3.0.0",
}
JUNIT = "4.13.2"


@dataclass
class Nginx:
    repo_url: str  # serves /usr/share/maven-repo
    dav_url: str  # WebDAV (PUT) root that SNAPSHOTs are deployed to
    dav_root: Path
    access_log: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def requests(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


@contextmanager
def nginx(workdir: Path) -> Iterator[Nginx]:
    """An nginx in the foreground on two loopback ports, configured and logging under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    dav_root = workdir / "dav"
    dav_root.mkdir(exist_ok=True)
    repo_port, dav_port = free_port(), free_port()
    temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    user = "user root;\n" if os.geteuid() == 0 else ""  # else workers run as nobody and miss the DAV dir
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/error.log;\n"
        "events { worker_connections 128; }\n"
        "http {\n"
        f"  access_log {workdir}/access.log;\n  log_not_found off;\n"
        f"  client_body_temp_path {temp['body']};\n  proxy_temp_path {temp['proxy']};\n"
        f"  fastcgi_temp_path {temp['fastcgi']};\n  uwsgi_temp_path {temp['uwsgi']};\n"
        f"  scgi_temp_path {temp['scgi']};\n"
        "  types { application/java-archive jar; text/xml xml pom; text/plain sha1 md5 sha256 sha512; }\n"
        "  default_type application/octet-stream;\n"
        f"  server {{ listen 127.0.0.1:{repo_port}; location / {{ root {MAVEN_REPO}; }} }}\n"
        f"  server {{ listen 127.0.0.1:{dav_port}; client_max_body_size 64m;\n"
        f"    location / {{ root {dav_root}; dav_methods PUT; create_full_put_path on; }} }}\n"
        "}\n"
    )
    proc = subprocess.Popen(
        ["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Nginx(
        f"http://127.0.0.1:{repo_port}/",
        f"http://127.0.0.1:{dav_port}/",
        dav_root,
        workdir / "access.log",
        proc,
    )
    try:
        try:
            wait_http(server.repo_url + f"junit/junit/{JUNIT}/junit-{JUNIT}.pom", timeout=10)
        except TimeoutError:
            server.stop()  # SIGTERM: the master takes its workers down with it (SIGKILL would not)
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"nginx did not start: {err}{(workdir / 'error.log').read_text()}") from None
        yield server
    finally:
        server.stop()


def _plugins_xml() -> str:
    return "".join(
        f"<plugin><groupId>org.apache.maven.plugins</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></plugin>"
        for a, v in PLUGINS.items()
    )


def write_project(
    root: Path, artifact_id: str, version: str, *, deps: str = "", sources: dict[str, str] | None = None
) -> Path:
    """A minimal jar project: pinned plugins, Java 17, ``deps`` (XML), ``sources`` (path -> text)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        f"  <groupId>org.example</groupId><artifactId>{artifact_id}</artifactId>"
        f"<version>{version}</version>\n"
        "  <packaging>jar</packaging>\n"
        "  <properties><maven.compiler.release>17</maven.compiler.release>"
        "<project.build.sourceEncoding>UTF-8</project.build.sourceEncoding></properties>\n"
        f"  <dependencies>{deps}</dependencies>\n"
        f"  <build><plugins>{_plugins_xml()}</plugins></build>\n"
        "</project>\n"
    )
    for rel, text in (sources or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def mvn(project: Path, settings: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``mvn -B -s settings ARGS`` in ``project``; the JVM tuned for a quick start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAVEN_", "JAVA_TOOL"))}
    env["MAVEN_OPTS"] = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto"
    return subprocess.run(
        ["mvn", "-B", "-ntp", "-s", str(settings), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_success(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0 or "BUILD SUCCESS" not in result.stdout:
        tail = "\n".join(result.stdout.splitlines()[-60:])
        raise AssertionError(f"mvn failed ({result.returncode}):\n{tail}\n{result.stderr[-2000:]}")


def jar_entry(jar: Path, name: str) -> str:
    with zipfile.ZipFile(jar) as z:
        return z.read(name).decode()


def deploy(project: Path, settings: Path, repository_url: str) -> None:
    """``mvn deploy`` of ``project`` to the (WebDAV) repository at ``repository_url``."""
    args = ("deploy", "-DskipTests", f"-DaltDeploymentRepository=deployed::default::{repository_url}")
    assert_success(mvn(project, settings, *args))
