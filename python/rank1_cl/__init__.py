"""rank1_cl: the continual-learning layer over open_clip (trainer, data, metrics, CLI, demo)."""
