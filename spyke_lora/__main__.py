"""``python -m spyke_lora``: the ``spyke-lora`` command."""

from ._cli import main

raise SystemExit(main())
