"""Circuit discovery: tasks, metrics, attribution methods, pruning and evaluation."""
