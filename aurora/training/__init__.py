"""The trainer side of Aurora: captured samples -> buffer -> TTT training -> guarded, versioned draft weights.

The service wires it: the engine hands finished requests' samples to `OnlineTrainer.add_sample`, calls
`request_finished`, and receives new weights through the `publish(state_dict, version)` callback.
Nothing here imports the engine or the server.
"""
from aurora.training.buffer import SampleBuffer
from aurora.training.trainer import OnlineTrainer, TrainConfig
from aurora.training.vocab import vocab_from_samples

__all__ = ["OnlineTrainer", "SampleBuffer", "TrainConfig", "vocab_from_samples"]
