"""``python -m loravariants ...``: the command line, also under a launcher that runs modules
(``accelerate launch -m loravariants train ...``, ``torchrun -m loravariants train ...``)."""

from .cli import main

raise SystemExit(main())
