"""Public ops: autograd functions and backend dispatch (``backend="auto"|"torch"|"triton"|"cuda"``)."""
