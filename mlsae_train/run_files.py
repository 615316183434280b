"""The names of a run directory's files (checkpoint.py says what each holds and writes and reads them). A leaf
module, so that formats/ can tell one of our runs from other tools' folders without importing checkpoint.py,
which imports it."""

CONFIG_FILE = "config.json"
SAE_FILE = "sae.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
