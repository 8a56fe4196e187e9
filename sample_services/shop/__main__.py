"""``python -m sample_services.shop [run|stop] [--duration S] [--quick] [--keep-running]``."""

from __future__ import annotations

import sys

from sample_services.shop.demo import main

sys.exit(main())
