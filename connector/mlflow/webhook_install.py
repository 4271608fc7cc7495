"""`mlflow-datahub webhooks install`: the MLflow webhook (MLflow 3.3+) that tells the running connector
what changed, created or brought up to date through MLflow's REST store with the configuration's
credentials."""

from __future__ import annotations

from connector.config import ConnectorConfig
from connector.errors import ConfigError, OperatorError
from connector.mlflow.webhooks import EVENTS


class InstallError(OperatorError):
    """MLflow refused the webhook; the message says why and what to change."""


def install(cfg: ConnectorConfig) -> str:
    """Create the webhook named `webhooks.name` in MLflow, or bring the existing one up to date (URL,
    events, secret, ACTIVE). Returns what was done, in one line."""
    from mlflow.entities.webhook import WebhookEvent, WebhookStatus
    from mlflow.exceptions import MlflowException

    from connector.mlflow.reader import MlflowReader, reader_settings

    w = cfg.webhooks
    if w is None:
        raise ConfigError("webhooks: section missing (needs at least `secret`, or MLFLOW_DATAHUB_WEBHOOK_SECRET)")
    url, secret = w.resolved_url(), w.resolved_secret()
    settings = reader_settings(cfg)
    registry = MlflowReader(settings).registry  # MLflow's REST store, with this configuration's credentials
    events = [WebhookEvent.from_str(e) for e in EVENTS]
    try:
        same_name = []
        token: str | None = None
        while True:
            page = registry.list_webhooks(max_results=100, page_token=token)
            same_name += [h for h in page if h.name == w.name]
            token = page.token
            if not token:
                break
        if same_name:
            hook = registry.update_webhook(same_name[0].webhook_id, url=url, events=events, secret=secret,
                                           status=WebhookStatus.ACTIVE)
            done = "updated"
        else:
            hook = registry.create_webhook(w.name, url, events, secret=secret, status=WebhookStatus.ACTIVE,
                                           description="mlflow-datahub: targeted re-reads of changed models")
            done = "created"
    except MlflowException as e:
        message = str(e.message).splitlines()[0][:300]
        hint = ""
        if "scheme" in message:
            hint = " (an http:// URL needs MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https on the MLflow server)"
        elif "non-public" in message:
            hint = " (a private or loopback URL needs MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true on the MLflow server)"
        elif "500" in message:
            hint = (" (an MLflow server restarted without a fixed MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY cannot "
                    "decrypt the webhook secrets it stored before; see the MLflow server's log)")
        raise InstallError(f"MLflow at {settings.registry_uri} refused webhook '{w.name}': {message}{hint}") from None
    line = f"{done} webhook '{hook.name}' (id {hook.webhook_id}) in MLflow at {settings.registry_uri}: " \
           f"POST {hook.url}, {len(EVENTS)} events, status {hook.status}"
    if len(same_name) > 1:
        line += f"; {len(same_name) - 1} more webhooks named '{w.name}' left as they are: " + \
                ", ".join(h.webhook_id for h in same_name[1:])
    return line
