"""How a worker of a multi-process run finds its caller: the environment the caller (``spyke_lora._launch``) sets and
the worker (``_worker``) reads."""

__all__ = ["CHANNEL_ENV", "KEY_ENV", "SPEC_ENV", "WORKER_MODULE"]

CHANNEL_ENV = "SPYKE_LORA_CHANNEL"  # host:port of the caller's listener
KEY_ENV = "SPYKE_LORA_CHANNEL_KEY"  # its authentication key, hex
SPEC_ENV = "SPYKE_LORA_WORKER_SPEC"  # the JSON file that says what to run
WORKER_MODULE = "spyke_lora._engine._worker"  # what accelerate's launcher starts on every rank (`python -m`)
