"""``python -m tunedeck``: the window, as the ``tunedeck`` command opens it."""

from tunedeck.gui.app import main

raise SystemExit(main())
