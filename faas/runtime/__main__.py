"""``python -m faas.runtime --id node-1``: the node agent."""

from faas.core.service import run_service
from faas.runtime.agent import build_app

if __name__ == "__main__":
    run_service(role="node", build_app=build_app)
