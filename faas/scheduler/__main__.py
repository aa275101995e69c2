"""``python -m faas.scheduler --id scheduler-1``."""

from faas.core.service import run_service
from faas.scheduler.app import build_app

if __name__ == "__main__":
    run_service(role="scheduler", build_app=build_app)
