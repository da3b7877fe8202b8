/* A frame's payload of the one common shape, read into a Record (payload.c).
 *
 * The payload is a msgpack array
 *
 *     [seq, prev_hash, host_id, time_ns, txn_last, originator_key, originator_version, topic,
 *      state]
 *
 * Accepted: seq an int equal to the sequence the chain expects, prev_hash 32 bytes of bin
 * equal to the chain's hash, host_id and topic str (strict UTF-8, as msgpack's raw=False),
 * time_ns and originator_version ints (any msgpack int encoding), txn_last a bool,
 * originator_key bin of 16 bytes or a str, state bin, and nothing after the array.
 */

#ifndef STRATA_PAYLOAD_H
#define STRATA_PAYLOAD_H

#include "frames.h"

#define RECORD_FIELDS 9

typedef struct {
    int64_t value; /* when !big */
    uint64_t big;  /* a uint64 above INT64_MAX */
    int is_big;
} Int;

typedef struct {
    const char *data;
    Py_ssize_t len;
} Span;

typedef struct {
    Int seq, time_ns, version;
    Span host_id, key, topic, state;
    int key_is_str;
    int txn_last;
} Fields;

/* Objects that repeat from record to record (host ids, topics, an aggregate's id) are built
 * once per scan: equal bytes in the buffer make the same immutable object. */
#define CACHE_SIZE 8

typedef struct {
    const char *data; /* the encoded bytes, in the buffer (alive for the whole call) */
    Py_ssize_t len;
    int is_str;
    PyObject *obj; /* a strong reference */
} CacheEntry;

typedef struct {
    CacheEntry entries[CACHE_SIZE];
    int next;
} Cache;

void cache_clear(Cache *c);

/* Whether ``payload`` is a record array of the common shape continuing the chain. */
int parse(const uint8_t *payload, Py_ssize_t length, int64_t chain_seq,
          const uint8_t *chain_hash, Fields *f);

/* Build the frame's Record; NULL with an exception set on a failure to allocate, NULL
 * without one when a string is not valid UTF-8 (the Python loop will see it again). */
PyObject *build_record(PyTypeObject *record_type, const Fields *f, const uint8_t *prev_hash,
                       Cache *strings, Cache *keys);

#endif
