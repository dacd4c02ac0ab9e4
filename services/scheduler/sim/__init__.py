"""Off the serving path: the simulator, the fake executor and the contiguous-allocation baseline."""
