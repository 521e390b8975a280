"""Training ELViS: photos and splits, views, feature pools, pairs, validation, the loop."""
