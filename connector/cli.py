"""The `mlflow-datahub` command."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from confluent_kafka import KafkaException

from connector import __version__
from connector.config import ConnectorConfig, load
from connector.errors import CommandFailed, ConfigError, OperatorError
from connector.redaction import redact, remember_secrets

if TYPE_CHECKING:
    from connector.mlflow.reader import MlflowReader
    from connector.mlflow.webhooks import WebhookReceiver
    from connector.pipeline.producer_role import WebhookRequests

log = logging.getLogger("mlflow-datahub")

# Environment variables that hold secrets: masked in every line the command writes.
SECRET_ENVIRONMENT = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_DATAHUB_WEBHOOK_SECRET",
                      "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET")


def _setup_logging(verbose: bool, log_format: str = "text") -> None:
    from connector.observability.logs import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("httpx", "httpx2", "mlflow", "datahub", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow's HTTP retries: the connector says what it retries in its own line.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _loaded(cfg_path: str) -> ConnectorConfig:
    """The configuration, with what it takes from the environment resolved (a missing value fails here)."""
    cfg = load(cfg_path)
    cfg.mlflow.resolved_tracking_uri()
    cfg.kafka.resolved_schema_registry()
    if cfg.webhooks is not None:
        cfg.webhooks.resolved_secret()
    return cfg


def _startup(cfg_path: str) -> ConnectorConfig:
    """Load the configuration and check that Kafka answers; topics are created if missing."""
    from connector.kafka.topics import ensure_topics

    cfg = _loaded(cfg_path)
    ensure_topics(cfg)
    return cfg


def _startup_with_reader(cfg_path: str, retry_for_seconds: float | None) -> tuple[ConnectorConfig, MlflowReader]:
    """`_startup` and `_reader` side by side: MLflow's client is imported and MLflow checked in a thread
    while Kafka is checked and the topics made, so that the first MLflow request does not wait for Kafka.
    A Kafka problem is reported first, as `_startup` then `_reader` would."""
    from connector.kafka.topics import ensure_topics

    cfg = _loaded(cfg_path)
    outcome: list[MlflowReader | BaseException] = []

    def check() -> None:
        try:
            outcome.append(_reader(cfg, retry_for_seconds))
        except BaseException as e:  # raised in the main thread, after Kafka's check
            outcome.append(e)

    checking = threading.Thread(target=check, name="mlflow-check", daemon=True)
    checking.start()
    ensure_topics(cfg)
    checking.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return cfg, outcome[0]


def _reader(cfg: ConnectorConfig, retry_for_seconds: float | None, check_seconds: float = 10.0) -> MlflowReader:
    from connector.mlflow.reader import MlflowReader, MlflowUnavailable, reader_settings

    reader = MlflowReader(reader_settings(cfg, retry_for_seconds=check_seconds))
    try:
        reader.check()
    except MlflowUnavailable as e:
        raise CommandFailed(f"source.config.tracking_uri: {e}") from None
    except OperatorError:
        raise
    except Exception as e:  # a URI MLflow cannot use at all
        raise CommandFailed(f"source.config.tracking_uri: MLflow at {reader.settings.tracking_uri} cannot be read: "
                      f"{str(e).splitlines()[0][:200]}") from None
    reader.settings = reader_settings(cfg, retry_for_seconds=retry_for_seconds)
    return reader


def _start_webhooks(cfg: ConnectorConfig, instance_id: str
                    ) -> tuple[WebhookReceiver | None, WebhookRequests | None]:
    """The webhook receiver (when configured): what it accepts goes to the webhook-requests topic, for the
    holder of the producer role, whichever instance that is (connector/pipeline/producer_role.py)."""
    if cfg.webhooks is None:
        return None, None
    from connector.mlflow.webhooks import WebhookReceiver
    from connector.pipeline.producer_role import WebhookRequests

    requests = WebhookRequests(cfg, instance_id)
    return WebhookReceiver.from_config(cfg.webhooks, requests).start(), requests


def _stop_webhooks(receiver: WebhookReceiver | None, requests: WebhookRequests | None) -> None:
    if receiver is not None:
        receiver.stop()
    if requests is not None:
        requests.close()


# -- commands -------------------------------------------------------------------------------------


def cmd_stack(args: argparse.Namespace) -> int:
    from connector.devstack import stack

    if args.action == "up":
        endpoints = stack.up(progress=lambda line: print(line, file=sys.stderr), secure=args.secure)
        print("\n".join(endpoints.as_env_lines()))
        if endpoints.secure is not None:  # the password stays in its file: its path is printed
            print("\n".join(endpoints.secure.as_env_lines()))
            print(f"secured Kafka: SASL_SSL on {endpoints.secure.sasl_ssl} (SCRAM-SHA-512 or PLAIN, CA "
                  f"{endpoints.secure.ca_location}), SASL_PLAINTEXT on {endpoints.secure.sasl_plaintext}; user "
                  f"{endpoints.secure.username}, password in {endpoints.secure.client_properties} (sasl.password); "
                  "see docs/operations.md, Secured Kafka", file=sys.stderr)
    elif args.action == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        for s in stack.status():
            state = f"running (pid {s.pid})" if s.running else "stopped"
            print(f"{s.name:16} {state:20} {s.address:32} log: {s.log_file}")
            if s.secure is not None:
                print(f"{'':16} {'':20} {s.secure.sasl_plaintext:32} SASL_PLAINTEXT ({', '.join(s.secure.mechanisms)})")
                print(f"{'':16} {'':20} {s.secure.sasl_ssl:32} SASL_SSL ({', '.join(s.secure.mechanisms)}), "
                      f"CA {s.secure.ca_location}")
                print(f"{'':16} {'':20} {'':32} user {s.secure.username}, password in {s.secure.client_properties}")
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from connector.pipeline.operations import serve

    cfg, reader = _startup_with_reader(args.config, retry_for_seconds=None)
    from connector.pipeline.producer_role import ProducerRole  # after MLflow's first request (_startup_with_reader)

    role = ProducerRole(cfg, reader, args.instance_id)
    receiver, requests = _start_webhooks(cfg, role.instance_id)
    operations = serve(cfg, mlflow=True, registry=False)
    try:
        role.run(_stop_on_signals())
    finally:
        _stop_webhooks(receiver, requests)
        if operations is not None:
            operations.stop()
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    from connector.pipeline.consumer import ChangeConsumer
    from connector.pipeline.operations import serve

    cfg = _startup(args.config)
    consumer = ChangeConsumer(cfg, args.instance_id)
    operations = serve(cfg, mlflow=False, registry=True)
    consumer.run(_stop_on_signals())
    if operations is not None:
        operations.stop()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Producer role and consumer together. Any number of instances run side by side: they share the change
    topic's partitions, and one of them at a time holds the producer role (connector/pipeline/producer_role.py)."""
    from connector.pipeline.operations import serve

    cfg, reader = _startup_with_reader(args.config, retry_for_seconds=None)
    from connector.pipeline.producer_role import ProducerRole  # after MLflow's first request (_startup_with_reader)

    stop = _stop_on_signals()
    role = ProducerRole(cfg, reader, args.instance_id)
    receiver, requests = _start_webhooks(cfg, role.instance_id)
    operations = serve(cfg, mlflow=True, registry=True)
    errors: list[BaseException] = []

    def guarded(fn: Callable[[threading.Event], object]) -> Callable[[], None]:
        def body() -> None:
            try:
                fn(stop)
            except BaseException as e:  # surfaced below, after the other side stopped
                errors.append(e)
                stop.set()
        return body

    def consume(stop: threading.Event) -> None:
        # Imported and made in its own thread (DataHub's modules, the registry client, the state restore), so
        # that neither MLflow's first request nor the producer's first cycle waits for it.
        from connector.pipeline.consumer import ChangeConsumer

        ChangeConsumer(cfg, role.instance_id).run(stop)

    threads = [threading.Thread(target=guarded(role.run), name="producer"),
               threading.Thread(target=guarded(consume), name="consumer")]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    _stop_webhooks(receiver, requests)
    if operations is not None:
        operations.stop()
    if errors:
        raise errors[0]
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from connector.kafka.topics import ensure_topics
    from connector.pipeline.snapshot import run_snapshot

    started = time.monotonic()
    cfg = _loaded(args.config)
    stop = _stop_on_signals()
    # Kafka's check and the topics are made while MLflow's client loads and MLflow is checked.
    result = run_snapshot(cfg, lambda: _reader(cfg, retry_for_seconds=args.mlflow_retry_seconds), stop,
                          args.instance_id, args.consumers, topics=lambda: ensure_topics(cfg))
    summary, stats = result.summary, result.stats
    print(f"snapshot {summary.snapshot_id}: {'complete' if summary.complete else 'INCOMPLETE'}")
    print(f"  entities: {sum(summary.entities.values())} "
          f"({', '.join(f'{n} {k.lower()}' for k, n in summary.entities.items())})")
    print(f"  events: {summary.events} (deletes: {summary.deletes})")
    features = result.features
    if features is not None:
        print(f"  features: signatures of {features.read} of {features.versions} model versions read after it, in "
              f"{features.seconds():.1f} s"
              + (f" (without features: {', '.join(f'{n} {k.lower()}' for k, n in sorted(features.warnings.items()))})"
                 if features.warnings else "")
              + (f"; not read: {features.reason}" if features.reason else ""))
    print(f"  MCPs acknowledged on {cfg.kafka.topics.mcp}: {sum(stats.mcps.values())} "
          f"(unchanged aspects skipped: {stats.unchanged}, soft deletes: {stats.soft_deletes})")
    for aspect, count in sorted(stats.mcps.items()):
        print(f"    {aspect:32} {count}")
    print(f"  seconds: {time.monotonic() - started:.1f}"
          + (f" (the snapshot {result.snapshot_seconds:.1f}, then its features pass)" if features is not None else ""))
    if not summary.complete:
        raise CommandFailed(f"snapshot incomplete: {summary.reason}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from connector.pipeline.replay import parse_timestamp, replay

    since = None if args.from_beginning else parse_timestamp(args.from_timestamp)
    cfg = _startup(args.config)
    summary = replay(cfg, since, _stop_on_signals(), args.instance_id)
    print("\n".join(summary.lines()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from connector.pipeline.status import read_status

    cfg = _startup(args.config)
    status = read_status(cfg)
    print(status.to_json() if args.json else "\n".join(status.lines()))
    return 0 if status.healthy else 1


def cmd_dump(args: argparse.Namespace) -> int:
    from connector.pipeline.dump import dump

    cfg = _startup(args.config)
    count = dump(cfg, Path(args.out))
    print(f"{count} MCPs from {cfg.kafka.topics.mcp} written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Local stack, demo content, streaming, and a live change seen on the MCP topic."""
    import os

    from connector.datahub.mapping import run_urn
    from connector.devstack import stack
    from connector.devstack.demo import live_change, populate
    from connector.kafka.clients import KafkaConnection
    from connector.kafka.reading import consumer_lag
    from connector.pipeline.consumer import ChangeConsumer
    from connector.pipeline.dump import read_mcps
    from connector.pipeline.producer import ChangeProducer

    if not (os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("SCHEMA_REGISTRY_URL")):
        endpoints = stack.up(progress=lambda line: print(line, file=sys.stderr))
        for line in endpoints.as_env_lines():
            name, _, value = line.partition("=")
            os.environ.setdefault(name, value)
    cfg = _startup(args.config)
    connection = KafkaConnection(cfg.kafka)
    tracking_uri = cfg.mlflow.resolved_tracking_uri()
    print(f"1. demo content in MLflow at {tracking_uri}")
    populate(tracking_uri)
    stop = _stop_on_signals()
    producer = ChangeProducer(cfg, _reader(cfg, retry_for_seconds=None))
    consumer = ChangeConsumer(cfg, args.instance_id)
    threads = [threading.Thread(target=producer.run, args=(stop,), name="producer", daemon=True),
               threading.Thread(target=consumer.run, args=(stop,), name="consumer", daemon=True)]
    for t in threads:
        t.start()

    def wait_for(what: str, condition: Callable[[], bool], seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if stop.is_set() or time.monotonic() > deadline or not all(t.is_alive() for t in threads):
                stop.set()
                raise CommandFailed(f"demo: gave up waiting for {what}")
            time.sleep(0.5)

    print("2. streaming: producer and consumer running (mlflow-datahub run does the same)")

    def caught_up() -> bool:
        if producer.position.last_snapshot_ms is None:
            return False
        return sum(consumer_lag(connection, cfg.kafka.topics.changes, cfg.kafka.consumer_group).values()) == 0

    wait_for("the consumer to catch up", caught_up)
    by_aspect = Counter(mcp.aspectName for _, mcp in read_mcps(cfg))
    print(f"   {cfg.kafka.topics.mcp} holds {sum(by_aspect.values())} MCPs "
          f"({sum(consumer.stats.mcps.values())} written now; unchanged aspects are never written twice):")
    for aspect, count in sorted(by_aspect.items()):
        print(f"     {aspect:32} {count}")
    written = sum(consumer.stats.mcps.values())
    versions_before = consumer.stats.mcps.get("versionProperties", 0)
    run_id = live_change(tracking_uri)
    print("3. live change in MLflow: a retrained run, registered as a new version of 'demo classifier'")
    started = time.monotonic()
    wait_for("the live change", lambda: consumer.stats.mcps.get("versionProperties", 0) > versions_before)
    print(f"   reached {cfg.kafka.topics.mcp} {time.monotonic() - started:.1f} s later: "
          f"{sum(consumer.stats.mcps.values()) - written} MCPs (run {run_urn(run_id)}, its model version and group)")
    stop.set()
    for t in threads:
        t.join(30)
    producer.close()
    print("4. read it back:  .venv/bin/mlflow-datahub dump -c examples/local.yml --out mcps.json")
    print("   keep streaming: .venv/bin/mlflow-datahub run -c examples/local.yml   (stop the stack: make stack-down)")
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from connector.mlflow.webhook_install import install

    print(install(load(args.config)))
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from connector.devstack.demo import populate

    cfg = load(args.config)
    populate(cfg.mlflow.resolved_tracking_uri())
    return 0


# -- parser ---------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlflow-datahub", description="Keep DataHub's catalog in step with MLflow "
                                "through Kafka.")
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="text for people (default), or one JSON object per line for log pipelines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable[[argparse.Namespace], int], text: str,
                config: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=text, description=text)
        c.set_defaults(fn=fn)
        if config:
            c.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML configuration (recipe)")
        return c

    s = command("stack", cmd_stack, "Install and run a local Kafka, schema registry and MLflow server.", False)
    s.add_argument("action", choices=["up", "down", "status"],
                   help="up: start what is not running and print its addresses as KEY=VALUE lines; "
                        "down: stop what `up` started; status: what runs where")
    s.add_argument("--secure", action="store_true",
                   help="up: the broker also gets SASL_PLAINTEXT and SASL_SSL listeners (PLAIN, SCRAM-SHA-512) with "
                        "a local CA; their addresses, the CA and the file with the dev credentials are printed")
    for name, fn, text in (
        ("run", cmd_run, "Producer and consumer together, until stopped."),
        ("produce", cmd_produce, "Publish MLflow changes to the change topic, until stopped."),
        ("consume", cmd_consume, "Turn change events into MCPs on DataHub's MCP topic, until stopped."),
    ):
        c = command(name, fn, text)
        c.add_argument("--instance-id", help="this instance's name in its groups (default: host name); each "
                                             "running instance needs its own (a Kubernetes pod's name will do)")
    snap = command("snapshot", cmd_snapshot, "One complete pass: exits once every MCP of it is acknowledged.")
    snap.add_argument("--instance-id", help="consumer instance name (default: host name; with several "
                      "consumers, NAME-1, NAME-2, ...)")
    snap.add_argument("--consumers", type=int, default=1, metavar="N",
                      help="consumer processes, each with its share of the change topic's partitions (default 1; "
                           "more pay off with cores to spare and many partitions)")
    snap.add_argument("--mlflow-retry-seconds", type=float, default=60.0,
                      help="how long to retry while MLflow does not answer (default 60)")
    rp = command("replay", cmd_replay, "Rewind the consumer group and reprocess the change topic (stop the "
                 "consumers first); exits at the end offsets the topic had when it started.")
    start = rp.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-beginning", action="store_true", help="from each partition's first offset")
    start.add_argument("--from-timestamp", metavar="T", help="from the first event published at or after T: "
                       "ISO-8601 (2026-11-27T10:00:00Z; UTC without a zone) or epoch milliseconds")
    rp.add_argument("--instance-id", help="consumer instance name (default: replay)")
    st = command("status", cmd_status, "What the connector's topics say: consumer lag, last complete snapshot, "
                 "entities known, dead letters, the producer's position; exit 0 when healthy, 1 when not.")
    st.add_argument("--json", action="store_true", help="as JSON (keys: consumer_lag, last_complete_snapshot, "
                    "entities_known, dead_letters, healthy, ...)")
    d = command("dump", cmd_dump, "Write the MCP topic's contents as a DataHub file-sink JSON file.")
    d.add_argument("--out", required=True, metavar="FILE.json")
    wh = command("webhooks", cmd_webhooks, "Manage the MLflow webhook (MLflow 3.3+, SQL store) that tells the "
                 "running connector what changed.")
    wh.add_argument("action", choices=["install"], help="install: create the webhook named webhooks.name in "
                    "MLflow, or update it (URL, events, secret, ACTIVE)")
    command("demo-data", cmd_demo_data, "Create the demo experiments, runs and models in MLflow.")
    demo = command("demo", cmd_demo, "Start the local stack, load demo data, stream it and show a live change.")
    demo.add_argument("--instance-id", help="consumer instance name (default: host name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose, args.log_format)
    remember_secrets(os.environ.get(name) for name in SECRET_ENVIRONMENT)
    try:
        return args.fn(args)
    except ConfigError as e:
        _say(f"configuration error: {e}")
    except OperatorError as e:
        _say(str(e))
    except KafkaException as e:
        _say(f"Kafka error: {e.args[0].str() if e.args else e}")
    except Exception:  # a bug: its traceback, with any secret in it masked
        print(redact(traceback.format_exc()).rstrip(), file=sys.stderr)
    return 1


def _say(line: str) -> None:
    """The command's last line: what stopped it, without secrets."""
    print(redact(f"mlflow-datahub: {line}"), file=sys.stderr)


def entry() -> NoReturn:
    """The `mlflow-datahub` command: `main()`, then an exit that skips the interpreter's teardown.

    Freeing every module of MLflow's and DataHub's takes about 0.4 s and does nothing a finished
    command needs. What an exit must do is still done: atexit handlers run, logs and output are
    flushed. While a thread that is not a daemon still runs, the exit is Python's own (it waits)."""
    code = main()
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # logging.shutdown among them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
