"""The computation DAG of a transformer and everything that is a graph."""
