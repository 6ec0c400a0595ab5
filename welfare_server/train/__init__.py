"""RL in the maze: rollouts (now), Dr. GRPO / GRPO / token REINFORCE and the trainer (next)."""
