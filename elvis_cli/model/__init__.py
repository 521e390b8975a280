"""Re-ranking models (ELViS, its compiled CPU loop, the chamfer baseline) and checkpoints."""
