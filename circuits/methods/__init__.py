"""Attribution methods: each turns an ``Experiment`` into ``EdgeScores`` (or ``NodeScores``).

Exact interventions: ``node_patching``, ``edge_patching``, ``path_patching``, ``acdc``.
"""
