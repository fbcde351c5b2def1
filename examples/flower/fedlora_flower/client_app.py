"""ClientApp: trains this node's client (its partition-id) with fedlora's local trainer."""
from pathlib import Path

from fedlora.integrations.flower import client_app

app = client_app(base_dir=Path(__file__).resolve().parents[1])
