"""An operation that records every execution in $SQUIRE_TEST_RECORD_FILE, so
a test can prove that a task ran, or that it did not."""

from __future__ import annotations

import json
import os
from typing import Any

from squire import operation


@operation("record")
def record(value: Any) -> Any:
    with open(os.environ["SQUIRE_TEST_RECORD_FILE"], "a") as f:
        f.write(json.dumps(value) + "\n")
    return value
