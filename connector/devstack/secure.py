"""The local broker's secured listeners (`stack up --secure`): SASL_PLAINTEXT and SASL_SSL, each offering
PLAIN and SCRAM-SHA-512, beside the PLAINTEXT listener that stays as it is.

Under `<root>/kafka/secure/`, made once and kept:

* `tls/`: a local CA and the broker's PKCS12 keystore, signed by it for 127.0.0.1 and localhost, made
  with the JDK's keytool; `tls/ca.pem` is the CA for librdkafka's `ssl.ca.location`;
* `client.properties`: the dev credentials (user `connector`, a random password made once per root) as
  librdkafka settings for the SASL_SSL listener with SCRAM-SHA-512 (`kcat -F client.properties` reads
  it too). Tests and people read the password from there; the stack never prints it.

PLAIN users are declared in the listeners' JAAS settings of the broker's properties; SCRAM users are
created (upserted) through the PLAINTEXT listener once the broker answers, so a broker whose storage
was formatted before it was ever secured gets them too.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from connector.devstack.layout import (
    HOST,
    SASL_MECHANISMS,
    SASL_PLAINTEXT,
    SASL_SSL,
    Layout,
    SecureListeners,
    StackError,
    read_properties,
)
from connector.devstack.processes import write_atomic

USERNAME = "connector"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_ITERATIONS = 8192
CERT_DAYS = 3650
SAN = f"SAN=ip:{HOST},dns:localhost"
_STORE_PASSWORD_ENV = "MLFLOW_DATAHUB_KEYSTORE_PASSWORD"


def tls_dir(layout: Layout) -> Path:
    return layout.secure_dir / "tls"


def ca_pem(layout: Layout) -> Path:
    return tls_dir(layout) / "ca.pem"


def client_properties(layout: Layout) -> Path:
    return layout.secure_dir / "client.properties"


def keytool(java: str) -> str:
    """The JDK's keytool beside `java` (else the one on PATH)."""
    beside = Path(java).parent / "keytool"
    found = str(beside) if beside.is_file() else shutil.which("keytool")
    if found is None:
        raise StackError(f"keytool (part of the JDK) is needed to make the secured broker's certificates; "
                         f"it is neither beside {java} nor on PATH")
    return found


def _keytool(tool: str, store_password: str, *args: str) -> None:
    env = {**os.environ, _STORE_PASSWORD_ENV: store_password}
    argv = [tool, *args]
    try:
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, env=env,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"keytool {args[0]} failed: {exc}") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise StackError(f"keytool {args[0]} failed (exit {result.returncode}): {output[-1] if output else ''}")


def _store(path: Path) -> list[str]:
    return ["-keystore", str(path), "-storetype", "PKCS12", "-storepass:env", _STORE_PASSWORD_ENV]


def make_ca(folder: Path, tool: str, name: str = "mlflow-datahub local CA") -> Path:
    """A CA (key and self-signed certificate) in `folder`/ca.p12; its certificate as PEM in
    `folder`/ca.pem, which is returned. The keystore's password is in `folder`/store-password."""
    folder.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(18)
    write_atomic(folder / "store-password", password + "\n", 0o600)
    store = _store(folder / "ca.p12")
    _keytool(tool, password, "-genkeypair", *store, "-alias", "ca", "-keyalg", "RSA", "-keysize", "2048",
             "-validity", str(CERT_DAYS), "-dname", f"CN={name}", "-ext", "bc:c")
    _keytool(tool, password, "-exportcert", *store, "-alias", "ca", "-rfc", "-file", str(folder / "ca.pem"))
    return folder / "ca.pem"


def store_password(layout: Layout) -> str:
    return (tls_dir(layout) / "store-password").read_text().strip()


def ensure_certificates(layout: Layout, java: str, progress: Callable[[str], None] | None = None) -> None:
    """The local CA and the broker's keystore signed by it, made once (in a temporary folder, renamed
    into place when complete)."""
    final = tls_dir(layout)
    if (final / "ca.pem").is_file() and (final / "broker.p12").is_file():
        return
    if progress is not None:
        progress(f"making a local CA and the broker's TLS certificate in {final} (keytool) ...")
    tool = keytool(java)
    layout.secure_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tls-", dir=layout.secure_dir))
    try:
        make_ca(tmp, tool)
        password = (tmp / "store-password").read_text().strip()
        broker = _store(tmp / "broker.p12")
        _keytool(tool, password, "-genkeypair", *broker, "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048",
                 "-validity", str(CERT_DAYS), "-dname", "CN=localhost", "-ext", SAN)
        _keytool(tool, password, "-certreq", *broker, "-alias", "broker", "-file", str(tmp / "broker.csr"))
        _keytool(tool, password, "-gencert", *_store(tmp / "ca.p12"), "-alias", "ca", "-rfc",
                 "-infile", str(tmp / "broker.csr"), "-outfile", str(tmp / "broker.pem"),
                 "-validity", str(CERT_DAYS), "-ext", SAN, "-ext", "KU=digitalSignature,keyEncipherment",
                 "-ext", "EKU=serverAuth")
        _keytool(tool, password, "-importcert", *broker, "-alias", "ca", "-file", str(tmp / "ca.pem"), "-noprompt")
        _keytool(tool, password, "-importcert", *broker, "-alias", "broker", "-file", str(tmp / "broker.pem"),
                 "-noprompt")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def password(layout: Layout) -> str:
    """The dev user's password: made once per root, kept in client.properties."""
    existing = read_properties(client_properties(layout)).get("sasl.password")
    return existing or secrets.token_urlsafe(18)


def write_client_properties(layout: Layout, listeners: dict[str, str], user_password: str) -> Path:
    """librdkafka settings for the SASL_SSL listener with SCRAM-SHA-512 (0600: it holds the password)."""
    path = client_properties(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by connector/devstack/secure.py: the local broker's SASL_SSL listener with SCRAM-SHA-512.",
        f"# Same user and password: PLAIN on either listener; SASL_PLAINTEXT on {listeners[SASL_PLAINTEXT]}.",
        f"bootstrap.servers={listeners[SASL_SSL]}",
        "security.protocol=SASL_SSL",
        f"sasl.mechanism={SCRAM_MECHANISM}",
        f"sasl.username={USERNAME}",
        f"sasl.password={user_password}",
        f"ssl.ca.location={ca_pem(layout)}",
    ]
    write_atomic(path, "\n".join(lines) + "\n", 0o600)
    return path


def broker_properties(layout: Layout, user_password: str) -> dict[str, str]:
    """What the broker's properties gain for the secured listeners (listeners themselves excluded)."""
    plain = ('org.apache.kafka.common.security.plain.PlainLoginModule required '
             f'user_{USERNAME}="{user_password}";')
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    out = {"sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS)}
    for listener in (SASL_PLAINTEXT, SASL_SSL):
        prefix = f"listener.name.{listener.lower()}"
        out[f"{prefix}.sasl.enabled.mechanisms"] = ",".join(SASL_MECHANISMS)
        out[f"{prefix}.plain.sasl.jaas.config"] = plain
        out[f"{prefix}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config"] = scram
    tls = f"listener.name.{SASL_SSL.lower()}"
    password_of_store = store_password(layout)
    out.update({
        f"{tls}.ssl.keystore.type": "PKCS12",
        f"{tls}.ssl.keystore.location": str(tls_dir(layout) / "broker.p12"),
        f"{tls}.ssl.keystore.password": password_of_store,
        f"{tls}.ssl.key.password": password_of_store,
        f"{tls}.ssl.client.auth": "none",
    })
    return out


def listeners_of(layout: Layout, record_listeners: dict[str, str]) -> SecureListeners:
    return SecureListeners(
        sasl_plaintext=record_listeners[SASL_PLAINTEXT],
        sasl_ssl=record_listeners[SASL_SSL],
        mechanisms=SASL_MECHANISMS,
        username=USERNAME,
        ca_location=ca_pem(layout),
        client_properties=client_properties(layout),
    )


def upsert_scram_user(plaintext_bootstrap: str, username: str, user_password: str, timeout: float = 30.0) -> None:
    """Create (or reset) a SCRAM-SHA-512 user through the broker's PLAINTEXT listener."""
    from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    from connector.kafka.clients import broker_probe

    admin = broker_probe(plaintext_bootstrap)
    upsert = UserScramCredentialUpsertion(username, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512,
                                                                        SCRAM_ITERATIONS),
                                          user_password.encode())
    for future in admin.alter_user_scram_credentials([upsert], request_timeout=timeout).values():
        future.result(timeout)


def delete_scram_user(plaintext_bootstrap: str, username: str, timeout: float = 30.0) -> None:
    from confluent_kafka.admin import ScramMechanism, UserScramCredentialDeletion

    from connector.kafka.clients import broker_probe

    admin = broker_probe(plaintext_bootstrap)
    deletion = UserScramCredentialDeletion(username, ScramMechanism.SCRAM_SHA_512)
    for future in admin.alter_user_scram_credentials([deletion], request_timeout=timeout).values():
        future.result(timeout)


def check_listeners(layout: Layout, listeners: dict[str, str], user_password: str, deadline: float) -> None:
    """Return once both secured listeners answer an authenticated metadata request (SCRAM over TLS,
    PLAIN without), else raise ConnectionError saying which does not."""
    from connector.kafka.clients import broker_probe

    checks = {
        f"{SASL_SSL} {SCRAM_MECHANISM}": (listeners[SASL_SSL], {
            "security.protocol": SASL_SSL, "sasl.mechanism": SCRAM_MECHANISM, "ssl.ca.location": str(ca_pem(layout))}),
        f"{SASL_PLAINTEXT} PLAIN": (listeners[SASL_PLAINTEXT], {
            "security.protocol": SASL_PLAINTEXT, "sasl.mechanism": "PLAIN"}),
    }
    for what, (address, settings) in checks.items():
        last = ""
        while True:
            try:
                broker_probe(address, {**settings, "sasl.username": USERNAME, "sasl.password": user_password}
                             ).list_topics(timeout=5)
                break
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = str(exc)
            if time.monotonic() > deadline:
                raise ConnectionError(f"the {what} listener on {address} does not answer ({last})")
            time.sleep(0.5)


def prepare(layout: Layout, java: str, progress: Callable[[str], None] | None = None
            ) -> tuple[dict[str, str], dict[str, str]]:
    """Certificates and credentials in place; the secured listeners (protocol -> host:port) and the
    broker properties they need."""
    ensure_certificates(layout, java, progress)
    listeners = layout.secure_listeners()
    user_password = password(layout)
    write_client_properties(layout, listeners, user_password)
    return listeners, broker_properties(layout, user_password)


def after_start(layout: Layout, record_address: str, listeners: dict[str, str], deadline: float) -> None:
    """Once the PLAINTEXT listener answers: the SCRAM user, then both secured listeners checked."""
    user_password = password(layout)
    upsert_scram_user(record_address, USERNAME, user_password, timeout=max(5.0, deadline - time.monotonic()))
    check_listeners(layout, listeners, user_password, deadline)

