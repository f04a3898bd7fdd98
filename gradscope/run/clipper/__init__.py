"""The Clipper's room: applying the advice in a user's loop (``apply.py``), with its guards' state on the
device (``guard_state.py``) and the exact skip of a whole optimizer step (``skipping.py``). Their settings
and rules are ``gradscope.advise.guards``'s; the methods' names, ``gradscope.analyse.clipping``'s."""
from .apply import Clipper, clip_norm_, clip_value_

__all__ = ["Clipper", "clip_norm_", "clip_value_"]
