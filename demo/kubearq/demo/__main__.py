"""`python -m kubearq.demo`: see `kubearq.demo.main`."""

import sys

try:
    from kubearq.demo.main import main
except KeyboardInterrupt:  # Ctrl-C while importing, before anything was started
    sys.exit(130)

sys.exit(main())
