"""spherelab as a library: `spherelab.track` measures your own model and training loop into the lab's
store (README, "Your own model")."""
from .detect import detect_si
from .track import Tracker, track

__all__ = ["Tracker", "detect_si", "track"]
