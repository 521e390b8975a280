"""Training ELViS: photo views and the training loop."""
