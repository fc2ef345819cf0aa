#!/opt/emoserve/bin/python
"""The image's HEALTHCHECK: exit 0 when the server in this container says it is ready (/readyz 200).
No curl in the image; the port is the server's own setting (EMOSERVE_PORT)."""

import os
import sys
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('EMOSERVE_PORT', '7860')}/readyz"
try:
    with urllib.request.urlopen(url, timeout=3) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except (OSError, urllib.error.URLError) as err:
    print(f"{url}: {err}", file=sys.stderr)
    sys.exit(1)
