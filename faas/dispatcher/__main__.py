"""``python -m faas.dispatcher --id dispatcher-1``."""

from faas.core.service import run_service
from faas.dispatcher.app import build_app

if __name__ == "__main__":
    run_service(role="dispatcher", build_app=build_app)
