#!/usr/bin/env python3
"""Writes the fuzz targets' seeds (fuzz/seeds/<target>/) from real change
events: the Debezium events of region A's topics on the running local stack
(JSON: cdc.public.*, Avro: cdc.avro.public.*), read with kcat, and framed as
the targets read their input: a 2-byte big-endian key length, the key, the
value. An Avro event's schema ids are rewritten to the ids the decode_avro
target gives the same schemas (schemas/avro/, which equal the registry's).

    source deploy/local/env.sh && python3 fuzz/capture_seeds.py

Run it after writing some rows (inserts, updates, deletes, a truncate) to
public.users and public.orders in region A; it takes up to PER_TOPIC events
per topic.
"""
import hashlib
import json
import os
import subprocess
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_TOPIC = 25
HOST = "127.0.0.1"
KAFKA = f"{HOST}:{os.environ.get('KAFKA_PORT_A', '19092')}"
REGISTRY = f"http://{HOST}:{os.environ.get('REGISTRY_PORT', '18081')}/apis/ccompat/v7"
# decode_avro's schema ids: SCHEMAS[id - 1] in fuzz_targets/decode_avro.rs.
AVRO_IDS = [
    "public.users-key", "public.users-value", "public.orders-key",
    "public.orders-value", "regionsync.heartbeat-key", "regionsync.heartbeat-value",
]
TOPICS = {
    "decode_json": ["cdc.public.users", "cdc.public.orders", "cdc.regionsync.heartbeat"],
    "decode_avro": ["cdc.avro.public.users", "cdc.avro.public.orders", "cdc.avro.regionsync.heartbeat"],
}


def events(topic):
    """(key, value) of the first PER_TOPIC events of `topic` (None: null)."""
    out = subprocess.run(
        ["kcat", "-C", "-b", KAFKA, "-t", topic, "-o", "beginning", "-c", str(PER_TOPIC),
         "-e", "-q", "-f", "%K %S\n%k%s"],
        check=True, capture_output=True, timeout=60).stdout
    found = []
    while out:
        header, out = out.split(b"\n", 1)
        key_len, value_len = (int(n) for n in header.split())
        key, out = (out[:key_len], out[key_len:]) if key_len >= 0 else (None, out)
        value, out = (out[:value_len], out[value_len:]) if value_len >= 0 else (None, out)
        found.append((key, value))
    return found


def committed_schemas():
    """The schemas/avro/ files as JSON, by decode_avro's schema id."""
    by_id = {}
    for i, stem in enumerate(AVRO_IDS):
        with open(os.path.join(ROOT, "schemas/avro", stem + ".avsc")) as f:
            by_id[i + 1] = json.load(f)
    return by_id


def fuzz_id(registry_id, cache={}):
    if registry_id not in cache:
        with urllib.request.urlopen(f"{REGISTRY}/schemas/ids/{registry_id}") as r:
            schema = json.loads(json.load(r)["schema"])
        matches = [i for i, s in committed_schemas().items() if s == schema]
        if not matches:
            sys.exit(f"registry schema {registry_id} is none of schemas/avro/")
        cache[registry_id] = matches[0]
    return cache[registry_id]


def rewrite(avro):
    """An Avro message with its schema id replaced by decode_avro's."""
    if avro is None or len(avro) < 5 or avro[0] != 0:
        return avro
    return b"\0" + fuzz_id(int.from_bytes(avro[1:5], "big")).to_bytes(4, "big") + avro[5:]


def main():
    for target, topics in TOPICS.items():
        directory = os.path.join(ROOT, "fuzz/seeds", target)
        os.makedirs(directory, exist_ok=True)
        written = 0
        for topic in topics:
            for key, value in events(topic):
                if target == "decode_avro":
                    key, value = rewrite(key), rewrite(value)
                key = key or b""
                seed = len(key).to_bytes(2, "big") + key + (value or b"")
                name = hashlib.sha1(seed).hexdigest()[:16]
                with open(os.path.join(directory, name), "wb") as f:
                    f.write(seed)
                written += 1
        print(f"{target}: {written} seeds in fuzz/seeds/{target}/")


if __name__ == "__main__":
    main()
