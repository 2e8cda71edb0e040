import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))  # server_fakes.live_server
