"""A Django cache reader, driven line by line.

    django_reader.py BACKEND LOCATIONS_CSV KEY_PREFIX VERSION [OPTIONS_JSON]

BACKEND is PyMemcacheCache or PyLibMCCache (django.core.cache.backends.memcached).
Each line on stdin is a key as the application passes it to cache.get();
each answer is one JSON line: {"value": ..., "types": {field: type name}}
with bytes as {"bytes": hex}, or {"value": null} on a miss.
"""
import json
import sys

import django
from django.conf import settings

backend, locations, key_prefix, version = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4])
options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
settings.configure(
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.memcached." + backend,
            "LOCATION": locations if len(locations) > 1 else locations[0],
            "KEY_PREFIX": key_prefix,
            "VERSION": version,
            "OPTIONS": options,
        }
    }
)
django.setup()
from django.core.cache import caches  # noqa: E402

cache = caches["default"]


def plain(v):
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


print(json.dumps({"ready": django.get_version()}), flush=True)
for line in sys.stdin:
    key = line.strip()
    if not key:
        continue
    v = cache.get(key)
    out = {"value": plain(v), "type": type(v).__name__}
    if isinstance(v, dict):
        out["types"] = {str(k): type(x).__name__ for k, x in v.items()}
    print(json.dumps(out), flush=True)
