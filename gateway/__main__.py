"""``python -m gateway --id gateway-1``: the public gateway on FAAS_GATEWAY_HOST:FAAS_GATEWAY_PORT."""

from faas.core.service import run_service
from faas.core.settings import Settings
from gateway.app import build_app

if __name__ == "__main__":
    _settings = Settings()
    # The public face: callers present API keys (gateway/auth.py), not the internal token.
    run_service(
        role="gateway", build_app=build_app, default_host=_settings.gateway_host,
        default_port=_settings.gateway_port, internal=False,
    )  # fmt: skip
