"""Installing the local stack's parts from Maven Central: Java and Maven checks, Kafka jars, Apicurio Registry."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from connector.devstack.layout import (
    APICURIO_VERSION,
    ENV_CACHE_DIR,
    KAFKA_VERSION,
    LOG4J_VERSION,
    MIN_JAVA,
    Layout,
    StackError,
    locked,
)

log = logging.getLogger("connector.stack")


def _java_major(version: str) -> int | None:
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if not match:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_292" style
        return int(match.group(2))
    return major


def check_java() -> str:
    """The absolute path of a Java >= 17 binary, or StackError."""
    message = (
        f"Java {MIN_JAVA} or newer is required for the Kafka broker and the schema registry; "
        "install e.g. openjdk-17-jre-headless"
    )
    java = shutil.which("java")
    if java is None:
        raise StackError(f"{message} (no `java` on PATH)")
    try:
        result = subprocess.run([java, "-version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"{message} (`{java} -version` failed: {exc})") from None
    found = re.search(r'version "([^"]+)"', result.stderr + result.stdout)
    major = _java_major(found.group(1)) if found else None
    if major is None or major < MIN_JAVA:
        seen = found.group(1) if found else "unknown version"
        raise StackError(f"{message} (found {seen} at {java})")
    return str(Path(java).resolve())


def _check_mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            f"Maven (`mvn`) is required once to download Kafka {KAFKA_VERSION} and Apicurio Registry "
            f"{APICURIO_VERSION}; install e.g. the `maven` package (or point {ENV_CACHE_DIR} at a "
            "folder that already holds them)"
        )
    return mvn


# --------------------------------------------------------------------------------------------
# installation (into the shared cache)

_KAFKA_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.mlflow-datahub</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


def _kafka_installed(layout: Layout) -> bool:
    libs = layout.kafka_home / "libs"
    return (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file() and (
        libs / f"log4j-slf4j-impl-{LOG4J_VERSION}.jar"
    ).is_file()


def _apicurio_installed(layout: Layout) -> bool:
    return layout.apicurio_jar.is_file() and (layout.apicurio_home / "lib").is_dir()


def tail(text_or_path: str | Path, lines: int = 15) -> str:
    if isinstance(text_or_path, Path):
        try:
            with open(text_or_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 16384))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return "(no log output)"
    else:
        text = text_or_path
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"  | {line}" for line in kept) if kept else "  | (no output)"


def _run_mvn(argv: list[str], cwd: Path, what: str) -> None:
    try:
        result = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise StackError(f"Maven timed out downloading {what}; check access to Maven Central") from None
    if result.returncode != 0:
        raise StackError(
            f"Maven could not download {what} (exit {result.returncode}); check access to Maven Central\n"
            + tail(result.stdout + "\n" + result.stderr)
        )


def _fresh_tmp(cache: Path, label: str) -> Path:
    """A new temporary folder in the cache, after removing leftovers of interrupted installs."""
    for leftover in cache.glob(f".tmp-{label}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{label}-", dir=cache))


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():  # incomplete or damaged copy from an older layout
        shutil.rmtree(final)
    os.rename(tmp, final)


def _install(layout: Layout, progress: Callable[[str], None], what: str, label: str, home: Path,
             installed: Callable[[Layout], bool], fetch: Callable[[str, Path], tuple[Path, str]]) -> None:
    """One install: under the cache's lock (another process may be installing the same), into a fresh
    temporary folder (`fetch(mvn, tmp)` fills it and returns the folder to publish and a detail for the
    last line), published by one rename, so that an interrupted install leaves nothing half there."""
    if installed(layout):
        return
    mvn = _check_mvn()
    with locked(layout.cache / ".lock", progress, "install"):
        if installed(layout):
            return
        started = time.monotonic()
        progress(f"installing {what} into {home} (Maven) ...")
        tmp = _fresh_tmp(layout.cache, label)
        try:
            built, detail = fetch(mvn, tmp)
            _publish(built, home)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        progress(f"installed {what}{detail} in {time.monotonic() - started:.0f} s")


def _fetch_kafka(mvn: str, tmp: Path) -> tuple[Path, str]:
    """The broker's jars and their runtime dependencies, as Maven resolves them."""
    (tmp / "pom.xml").write_text(_KAFKA_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    _run_mvn([mvn, "-q", "-B", "-f", str(tmp / "pom.xml"), "dependency:copy-dependencies",
              f"-DoutputDirectory={tmp / 'libs'}", "-DincludeScope=runtime"],
             cwd=tmp, what=f"Kafka {KAFKA_VERSION}")
    jars = list((tmp / "libs").glob("*.jar"))
    if not (tmp / "libs" / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        raise StackError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is missing in {tmp}")
    return tmp, f" ({len(jars)} jars)"


def _fetch_apicurio(mvn: str, tmp: Path) -> tuple[Path, str]:
    """Apicurio Registry's `all` zip, unpacked: the folder of its runner jar."""
    download = tmp / "download"
    _run_mvn([mvn, "-q", "-B", "dependency:copy",
              f"-Dartifact=io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:zip:all",
              f"-DoutputDirectory={download}"],
             cwd=tmp, what=f"Apicurio Registry {APICURIO_VERSION}")
    archive = download / f"apicurio-registry-app-{APICURIO_VERSION}-all.zip"
    if not archive.is_file():
        raise StackError(f"Maven finished but {archive.name} is missing in {download}")
    app = tmp / "app"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(app)
    runners = list(app.rglob(f"apicurio-registry-app-{APICURIO_VERSION}-runner.jar"))
    if not runners:
        raise StackError(f"{archive.name} has no apicurio-registry-app-{APICURIO_VERSION}-runner.jar")
    return runners[0].parent, ""


def install_kafka(layout: Layout, progress: Callable[[str], None]) -> None:
    _install(layout, progress, f"Kafka {KAFKA_VERSION}", "kafka", layout.kafka_home, _kafka_installed, _fetch_kafka)


def install_apicurio(layout: Layout, progress: Callable[[str], None]) -> None:
    _install(layout, progress, f"Apicurio Registry {APICURIO_VERSION}", "apicurio", layout.apicurio_home,
             _apicurio_installed, _fetch_apicurio)


# --------------------------------------------------------------------------------------------
# processes


