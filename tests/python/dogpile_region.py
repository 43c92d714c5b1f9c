"""A dogpile.cache region configured as the README says, reading a
tailcache-managed key for longer than the region's expiration time.

    dogpile_region.py SERVERS_CSV KEY_PREFIX KEY EXPIRATION SECONDS

Calls the README's `tailcache_get(KEY, creator)` every 50 ms for SECONDS
(> EXPIRATION) and prints one JSON line: how often the creator ran and the
distinct names read. Exits 1 if the creator ever ran.
"""
import json
import sys
import time

import msgpack
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE, CachedValue
from dogpile.cache.proxy import ProxyBackend

servers, prefix, key = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
expiration, seconds = float(sys.argv[4]), float(sys.argv[5])


# --- as in the README -------------------------------------------------------
class MsgpackProxy(ProxyBackend):
    def get(self, key):
        v = self.proxied.get(key)
        if not v or v is NO_VALUE:
            return NO_VALUE
        payload, metadata = msgpack.unpackb(v, raw=False)
        return CachedValue(payload, metadata)

    def get_multi(self, keys):
        return [self.get(k) for k in keys]

    def set(self, key, value):
        self.proxied.set(key, msgpack.packb(list(value), use_bin_type=True))

    def set_multi(self, mapping):
        for k, v in mapping.items():
            self.set(k, v)


region = make_region(key_mangler=lambda key: prefix + key).configure(
    "dogpile.cache.pymemcache",
    expiration_time=expiration,
    arguments={"url": servers},
    wrap=[MsgpackProxy],
)


def tailcache_get(key, creator):
    # tailcache keeps this key fresh: never expired for dogpile, and what the
    # fallback creator returns is never written under tailcache's key.
    return region.get_or_create(key, creator, expiration_time=-1, should_cache_fn=lambda _: False)
# ---------------------------------------------------------------------------


calls = []


def creator():
    calls.append(time.time())
    return {"name": "from-creator"}


names = []
start = time.time()
while time.time() - start < seconds:
    v = tailcache_get(key, creator)
    n = v.get("name") if isinstance(v, dict) else repr(v)
    if not names or names[-1] != n:
        names.append(n)
    time.sleep(0.05)
print(json.dumps({"creator_calls": len(calls), "names": names}))
sys.exit(1 if calls else 0)
