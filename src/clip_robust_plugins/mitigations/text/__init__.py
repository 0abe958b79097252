"""Training-free, text-side baselines (group prompts, Orth-Proj/Cali, RoboShot, PerceptionCLIP, TIE*)."""
