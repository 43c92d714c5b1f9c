"""Checks tailcache's key placement against a real Python memcached client.

    placement.py MODE SERVERS_CSV PREFIX COUNT [WEIGHTS_CSV]

tailcache has written COUNT keys PREFIX0 .. PREFIX{COUNT-1}, each with the
value b"v:" + key and flags 0, with memcached.distribution = MODE over
SERVERS (host:port, in order). For every key this checks that
  * exactly one server holds it (read from each server directly),
  * that server is the one the client picks (where the client tells), and
  * the client, configured as its users configure it, reads the value.
Prints one JSON line with the counts per server; exits 1 naming the first
disagreements.
"""
import json
import sys

from pymemcache.client.base import Client as Direct

mode, servers_csv, prefix, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
servers = servers_csv.split(",")
weights = [int(w) for w in sys.argv[5].split(",")] if len(sys.argv) > 5 and sys.argv[5] else [1] * len(servers)


def hp(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


direct = {s: Direct(hp(s), connect_timeout=2, timeout=2) for s in servers}

choose = None  # key -> server name, where the client tells
if mode == "modula":
    import memcache  # python-memcached

    client = memcache.Client([(s, w) for s, w in zip(servers, weights)])

    def choose(key):
        server, _ = client._get_server(key.encode())
        return "%s:%s" % (server.ip, server.port)

elif mode in ("ketama", "ketama_weighted", "pylibmc"):
    import pylibmc

    behaviors = {"ketama": {"ketama": True}, "ketama_weighted": {"ketama_weighted": True}, "pylibmc": {}}[mode]
    specs = ["%s:%d" % (s, w) if w != 1 else s for s, w in zip(servers, weights)]
    client = pylibmc.Client(specs, behaviors=behaviors)
elif mode == "rendezvous":
    from pymemcache.client.hash import HashClient

    client = HashClient(servers, connect_timeout=2, timeout=2)

    def choose(key):
        return client.hasher.get_node(key)

else:
    sys.exit("unknown mode %r" % mode)

per_server = {s: 0 for s in servers}
problems = []
for i in range(count):
    key = "%s%d" % (prefix, i)
    want = b"v:" + key.encode()
    holders = [s for s in servers if direct[s].get(key) is not None]
    if len(holders) != 1:
        problems.append("%s held by %s" % (key, holders or "no server"))
        continue
    per_server[holders[0]] += 1
    if choose is not None and choose(key) != holders[0]:
        problems.append("%s: tailcache chose %s, the client %s" % (key, holders[0], choose(key)))
    got = client.get(key)
    if isinstance(got, str):  # python-memcached may decode
        got = got.encode()
    if got != want:
        problems.append("%s: the client read %r" % (key, got))

print(json.dumps({"mode": mode, "per_server": per_server, "problems": len(problems)}))
if problems:
    print("\n".join(problems[:20]), file=sys.stderr)
    sys.exit(1)
