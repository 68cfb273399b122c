"""Stage 2: generators, token injection, scorer and rewards, grounding, RL, generation, gallery, evaluation."""
