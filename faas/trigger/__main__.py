"""``python -m faas.trigger --id trigger-1``."""

from faas.core.service import run_service
from faas.trigger.app import build_app

if __name__ == "__main__":
    run_service(role="trigger", build_app=build_app)
