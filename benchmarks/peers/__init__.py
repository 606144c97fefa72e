"""Side-by-side runs of our methods and the peer tools (auto-circuit on TransformerLens).

Modules:

- ``venv``: creates the peers' own virtual environment and installs them there (never as project
  dependencies).
- ``data``: the models (local random-weight GPT-2s, the cached SmolLM2-135M folder) and one shared
  data file of IOI prompts, written by the project interpreter and read by both sides.
- ``scorefile``: the score file format both sides write (scores keyed by *our* edge ids).
- ``run_ours``: the child process that runs our EAP / ACDC (project interpreter).
- ``run_autocircuit``: the child process that runs auto-circuit (peers venv; imports nothing from
  this project, only torch, safetensors, transformers, TransformerLens and auto-circuit).
- ``compare``: agreement statistics between two score files.
- ``replay``: plain sequential ACDC in a given edge order (auto-circuit's, recorded by its child),
  with our forward passes, to separate the effect of the visiting order from everything else.
"""
