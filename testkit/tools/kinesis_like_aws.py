"""(Copied from the project's shared test tools; keep the two in step.)

moto_server with Kinesis patched to behave like AWS where moto does not:

* SplitShard / MergeShards close the parent(s), which KEEP their records; children
  start empty (moto moves/copies the parent's records into the children and
  keeps routing new puts to the closed parent).
* PutRecord(s) route only to OPEN shards.
* GetRecords on a closed shard that is read to its end returns
  NextShardIterator = null (moto always returns an iterator).
* A closed shard reports EndingSequenceNumber (AWS: larger than its last record).
* Sequence numbers are stream-wide increasing 56-digit numbers (AWS-like), so a
  child's numbers exceed its parents'.
* Optional iterator expiry: EMU_ITER_TTL seconds (AWS: 300 s); moto has none.

Usage: python kinesis_like_aws.py PORT   (MODE=moto: unpatched moto; SEQ_STYLE=small: 7-digit numbers; EMU_ITER_TTL=300: iterator expiry)
Tested with moto 5.2.5 (it patches moto internals: pin moto when you use it).
"""
import base64
import os
import sys
import threading
import time
from collections import OrderedDict

MODE = os.environ.get("MODE", "faithful")
TTL = float(os.environ.get("EMU_ITER_TTL", "0"))

if MODE == "faithful":
    from moto.kinesis import models as M
    from moto.kinesis import utils as U
    from moto.kinesis.exceptions import InvalidArgumentError
    from moto.core.exceptions import JsonRESTError

    class ExpiredIterator(JsonRESTError):
        def __init__(self, msg):
            super().__init__(error_type="ExpiredIteratorException", message=msg)

    LOCK = threading.RLock()
    # SEQ_STYLE=aws: 56-digit numbers like AWS's; small: numbers that fit an i64
    SEQ = [49_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000
           if os.environ.get("SEQ_STYLE", "aws") == "aws" else 1_000_000]
    STATS = {"expired": 0, "shard_end": 0}

    def next_seq():
        with LOCK:
            SEQ[0] += 1000
            return SEQ[0]

    def shard_put_record(self, partition_key, data, explicit_hash_key):
        with LOCK:
            if not self.is_open:
                raise InvalidArgumentError(f"put to closed shard {self.shard_id}")
            seq = next_seq()
            self.records[seq] = M.Record(partition_key, data, seq, explicit_hash_key)
            return str(seq)

    M.Shard.put_record = shard_put_record

    def get_shard_for_key(self, partition_key, explicit_hash_key):
        if explicit_hash_key:
            int_key = int(explicit_hash_key)
        else:
            int_key = int(M.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
        for shard in self.shards.values():
            if shard.is_open and shard.starting_hash <= int_key <= shard.ending_hash:
                return shard
        return None

    M.Stream.get_shard_for_key = get_shard_for_key

    orig_to_json = M.Shard.to_json

    def to_json(self):
        r = orig_to_json(self)
        start = getattr(self, "start_seq", None)
        if start is not None:
            r["SequenceNumberRange"]["StartingSequenceNumber"] = str(start)
        if not self.is_open:
            r["SequenceNumberRange"]["EndingSequenceNumber"] = str(self.end_seq)
        return r

    M.Shard.to_json = to_json

    orig_shard_init = M.Shard.__init__

    def shard_init(self, *a, **kw):
        orig_shard_init(self, *a, **kw)
        self.start_seq = SEQ[0] + 1

    M.Shard.__init__ = shard_init

    def close(shard):
        shard.is_open = False
        # AWS: the ending sequence number is above the last record's
        shard.end_seq = next_seq() + 999

    def split_shard(self, shard_to_split, new_starting_hash_key):
        with LOCK:
            h = int(new_starting_hash_key)
            shard = self.shards[shard_to_split]
            if not (shard.starting_hash < h < shard.ending_hash):
                raise InvalidArgumentError("bad NewStartingHashKey")
            if not shard.is_open:
                raise InvalidArgumentError(f"{shard.shard_id} already closed")
            last_id = max(s._shard_id for s in self.shards.values())
            close(shard)
            a = M.Shard(last_id + 1, shard.starting_hash, h - 1, parent=shard.shard_id)
            b = M.Shard(last_id + 2, h, shard.ending_hash, parent=shard.shard_id)
            self.shards[a.shard_id] = a
            self.shards[b.shard_id] = b

    def merge_shards(self, shard_to_merge, adjacent_shard_to_merge):
        with LOCK:
            s1 = self.shards[shard_to_merge]
            s2 = self.shards[adjacent_shard_to_merge]
            if s1.ending_hash + 1 == s2.starting_hash:
                lo, hi = s1, s2
            elif s2.ending_hash + 1 == s1.starting_hash:
                lo, hi = s2, s1
            else:
                raise InvalidArgumentError("shards not adjacent")
            if not (s1.is_open and s2.is_open):
                raise InvalidArgumentError("shard already closed")
            last_id = max(s._shard_id for s in self.shards.values())
            close(s1)
            close(s2)
            n = M.Shard(last_id + 1, lo.starting_hash, hi.ending_hash,
                        parent=s1.shard_id, adjacent_parent=s2.shard_id)
            self.shards[n.shard_id] = n

    M.Stream.split_shard = split_shard
    M.Stream.merge_shards = merge_shards

    def compose(stream_name, shard, last_sequence_id):
        return base64.encodebytes(
            f"{stream_name}:{shard.shard_id}:{last_sequence_id}:{time.time()}".encode()
        ).decode()

    orig_new = U.compose_new_shard_iterator

    def compose_new(stream_name, shard, typ, starting, at_ts):
        it = orig_new(stream_name, shard, typ, starting, at_ts)
        parts = base64.decodebytes(it.encode()).decode().split(":")
        return compose(parts[0], shard, int(parts[2]))

    U.compose_shard_iterator = compose
    U.compose_new_shard_iterator = compose_new
    M.compose_shard_iterator = compose
    M.compose_new_shard_iterator = compose_new

    def get_records(self, stream_arn, shard_iterator, limit):
        stream_name, shard_id, last, issued = (
            base64.decodebytes(shard_iterator.encode()).decode().split(":")
        )
        if TTL and time.time() - float(issued) > TTL:
            STATS["expired"] += 1
            print(f"EMU expired iterator {shard_id} age {time.time()-float(issued):.1f}s",
                  file=sys.stderr, flush=True)
            raise ExpiredIterator(f"Iterator expired for {shard_id}")
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        shard = stream.get_shard(shard_id)
        with LOCK:
            records, last_seq, behind = shard.get_records(last, limit)
            if not shard.is_open and last_seq >= shard.get_max_sequence_number():
                STATS["shard_end"] += 1
                nxt = None
            else:
                nxt = compose(stream_name, shard, last_seq)
        return nxt, records, behind

    M.KinesisBackend.get_records = get_records

from moto.server import main

main(["-H", "127.0.0.1", "-p", sys.argv[1]])
