"""lorablend: LoRA adapters without gradient training, on a CPU."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft whenever it is installed) tries to fetch a CPU kernel from the hub on import and
# warns when it cannot (always offline, and on every CPU without it); lorablend does not use that kernel.
for _name in ("bitsandbytes", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)
