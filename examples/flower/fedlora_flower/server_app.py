"""ServerApp: samples nodes, sends each the factors of its own rank, aggregates with the fedlora strategy."""
from pathlib import Path

from fedlora.integrations.flower import server_app

app = server_app(base_dir=Path(__file__).resolve().parents[1])
