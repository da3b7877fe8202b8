/* The log scanner's fast path: the frames of the one common shape, read in C.
 *
 * See docs/adr/0008-compiled-fast-path-for-the-log-scanner.md. engine/log/scan.py is the
 * reference: its loop calls scan_frames() first, which reads as many frames as it is sure
 * about, exactly as the Python loop would read them, and stops *before* the first frame it is
 * not sure about. The Python loop then reads that frame as it always has (every edge case,
 * damage and torn tails stay in Python) and calls scan_frames() again after it. So this file
 * may only ever accept a frame the Python loop accepts, and must build the very same objects.
 *
 * A frame (docs/adr/0002-operation-log-format.md):
 *
 *     u32 length | u32 crc32(payload) | u32 crc32(first 8 bytes) | payload
 *
 * with the payload a msgpack array
 *
 *     [seq, prev_hash, host_id, time_ns, txn_last, originator_key, originator_version, topic,
 *      state]
 *
 * Accepted here: seq an int equal to the sequence the chain expects, prev_hash 32 bytes of bin
 * equal to the chain's hash, host_id and topic str (strict UTF-8, as msgpack's raw=False),
 * time_ns and originator_version ints (any msgpack int encoding), txn_last a bool,
 * originator_key bin of 16 bytes or a str, state bin, and nothing after the array. Like the
 * Python loop, no checksum is read: the next record's prev_hash vouches for every frame, and
 * scan.py checks the last frame's checksums itself.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FRAME_HEADER_SIZE 12
#define MAX_PAYLOAD (16u * 1024u * 1024u) /* engine.log.framing.MAX_PAYLOAD */
#define HASH_SIZE 32
#define RECORD_FIELDS 9

/* ---------------------------------------------------------------------------------------- */
/* BLAKE2b (RFC 7693), unkeyed, one-shot over a contiguous buffer.                           */

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t
load64_le(const uint8_t *p)
{
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static inline uint64_t
rotr64(uint64_t x, unsigned n)
{
    return (x >> n) | (x << (64 - n));
}

#define B2B_G(a, b, c, d, x, y)         \
    do {                                \
        v[a] = v[a] + v[b] + (x);       \
        v[d] = rotr64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y);       \
        v[d] = rotr64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];             \
        v[b] = rotr64(v[b] ^ v[c], 63); \
    } while (0)

static void
blake2b_compress(uint64_t h[8], const uint8_t block[128], uint64_t counter, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 16; i++) {
        m[i] = load64_le(block + 8 * i);
    }
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= counter; /* frames are at most 16 MiB: the counter's high word stays 0 */
    if (last) {
        v[14] = ~v[14];
    }
    /* Unrolled, so that every message index is a constant: a sixth faster than a loop. */
#define B2B_ROUND(r)                                                         \
    do {                                                                     \
        const uint8_t *s = blake2b_sigma[r];                                 \
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);                                \
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);                                \
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);                               \
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);                               \
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);                               \
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);                             \
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);                              \
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);                              \
    } while (0)
    B2B_ROUND(0);
    B2B_ROUND(1);
    B2B_ROUND(2);
    B2B_ROUND(3);
    B2B_ROUND(4);
    B2B_ROUND(5);
    B2B_ROUND(6);
    B2B_ROUND(7);
    B2B_ROUND(8);
    B2B_ROUND(9);
    B2B_ROUND(10);
    B2B_ROUND(11);
#undef B2B_ROUND
    for (int i = 0; i < 8; i++) {
        h[i] ^= v[i] ^ v[i + 8];
    }
}

/* BLAKE2b with a 32-byte digest, no key, salt or personalization: hashlib.blake2b(digest_size=32). */
static void
blake2b_256(const uint8_t *data, size_t len, uint8_t out[HASH_SIZE])
{
    uint64_t h[8];
    uint8_t block[128];
    uint64_t counter = 0;
    memcpy(h, blake2b_iv, sizeof h);
    h[0] ^= 0x01010000ULL ^ HASH_SIZE; /* fanout 1, depth 1, no key, digest length */
    while (len > 128) {
        counter += 128;
        blake2b_compress(h, data, counter, 0);
        data += 128;
        len -= 128;
    }
    memset(block, 0, sizeof block);
    memcpy(block, data, len);
    counter += len;
    blake2b_compress(h, block, counter, 1);
    for (int i = 0; i < HASH_SIZE; i++) {
        out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The msgpack subset of a record payload.                                                   */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Reader;

typedef struct {
    int64_t value; /* when !big */
    uint64_t big;  /* a uint64 above INT64_MAX */
    int is_big;
} Int;

typedef struct {
    const char *data;
    Py_ssize_t len;
} Span;

static inline uint32_t
be16(const uint8_t *p)
{
    return ((uint32_t)p[0] << 8) | p[1];
}

static inline uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
be64(const uint8_t *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* Each reader returns 1 and advances on a value of its type, else returns 0. */

static int
read_int(Reader *r, Int *out)
{
    if (r->p >= r->end) {
        return 0;
    }
    uint8_t tag = *r->p;
    Py_ssize_t avail = r->end - r->p - 1;
    const uint8_t *b = r->p + 1;
    out->is_big = 0;
    if (tag <= 0x7f) {
        out->value = tag;
        r->p += 1;
        return 1;
    }
    if (tag >= 0xe0) {
        out->value = (int8_t)tag;
        r->p += 1;
        return 1;
    }
    switch (tag) {
    case 0xcc: /* uint8 */
        if (avail < 1) return 0;
        out->value = b[0];
        r->p += 2;
        return 1;
    case 0xcd: /* uint16 */
        if (avail < 2) return 0;
        out->value = be16(b);
        r->p += 3;
        return 1;
    case 0xce: /* uint32 */
        if (avail < 4) return 0;
        out->value = be32(b);
        r->p += 5;
        return 1;
    case 0xcf: { /* uint64 */
        if (avail < 8) return 0;
        uint64_t u = be64(b);
        if (u > (uint64_t)INT64_MAX) {
            out->is_big = 1;
            out->big = u;
        }
        else {
            out->value = (int64_t)u;
        }
        r->p += 9;
        return 1;
    }
    case 0xd0: /* int8 */
        if (avail < 1) return 0;
        out->value = (int8_t)b[0];
        r->p += 2;
        return 1;
    case 0xd1: /* int16 */
        if (avail < 2) return 0;
        out->value = (int16_t)be16(b);
        r->p += 3;
        return 1;
    case 0xd2: /* int32 */
        if (avail < 4) return 0;
        out->value = (int32_t)be32(b);
        r->p += 5;
        return 1;
    case 0xd3: /* int64 */
        if (avail < 8) return 0;
        out->value = (int64_t)be64(b);
        r->p += 9;
        return 1;
    default:
        return 0;
    }
}

/* A length-prefixed value: str when ``str`` is set, else bin. */
static int
read_raw(Reader *r, int str, Span *out)
{
    if (r->p >= r->end) {
        return 0;
    }
    uint8_t tag = *r->p;
    Py_ssize_t avail = r->end - r->p - 1;
    const uint8_t *b = r->p + 1;
    Py_ssize_t len, head;
    if (str && tag >= 0xa0 && tag <= 0xbf) {
        len = tag & 0x1f;
        head = 1;
    }
    else if (tag == (str ? 0xd9 : 0xc4)) {
        if (avail < 1) return 0;
        len = b[0];
        head = 2;
    }
    else if (tag == (str ? 0xda : 0xc5)) {
        if (avail < 2) return 0;
        len = be16(b);
        head = 3;
    }
    else if (tag == (str ? 0xdb : 0xc6)) {
        if (avail < 4) return 0;
        len = be32(b); /* at most MAX_PAYLOAD bytes are available anyway */
        head = 5;
    }
    else {
        return 0;
    }
    if (avail - (head - 1) < len) {
        return 0;
    }
    out->data = (const char *)r->p + head;
    out->len = len;
    r->p += head + len;
    return 1;
}

static int
read_array_header(Reader *r, uint32_t *count)
{
    Py_ssize_t avail = r->end - r->p;
    if (avail < 1) {
        return 0;
    }
    uint8_t tag = *r->p;
    if (tag >= 0x90 && tag <= 0x9f) {
        *count = tag & 0x0f;
        r->p += 1;
        return 1;
    }
    if (tag == 0xdc && avail >= 3) {
        *count = be16(r->p + 1);
        r->p += 3;
        return 1;
    }
    if (tag == 0xdd && avail >= 5) {
        *count = be32(r->p + 1);
        r->p += 5;
        return 1;
    }
    return 0;
}

static PyObject *
new_int(const Int *i)
{
    return i->is_big ? PyLong_FromUnsignedLongLong(i->big) : PyLong_FromLongLong(i->value);
}

/* ---------------------------------------------------------------------------------------- */
/* Objects that repeat from record to record (host ids, topics, an aggregate's id) are built  */
/* once per call: equal bytes in the buffer make the same immutable object.                  */

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

static void
cache_clear(Cache *c)
{
    for (int i = 0; i < CACHE_SIZE; i++) {
        Py_CLEAR(c->entries[i].obj);
    }
}

/* A new reference to the str (strict UTF-8) or bytes of ``span``; NULL with an exception set
 * when it cannot be built. */
static PyObject *
cached(Cache *c, Span span, int is_str)
{
    for (int i = 0; i < CACHE_SIZE; i++) {
        CacheEntry *e = &c->entries[i];
        if (e->obj != NULL && e->len == span.len && e->is_str == is_str &&
            memcmp(e->data, span.data, (size_t)span.len) == 0) {
            Py_INCREF(e->obj);
            return e->obj;
        }
    }
    PyObject *obj = is_str ? PyUnicode_DecodeUTF8(span.data, span.len, NULL)
                           : PyBytes_FromStringAndSize(span.data, span.len);
    if (obj == NULL) {
        return NULL;
    }
    CacheEntry *e = &c->entries[c->next];
    c->next = (c->next + 1) % CACHE_SIZE;
    Py_XDECREF(e->obj);
    e->data = span.data;
    e->len = span.len;
    e->is_str = is_str;
    Py_INCREF(obj);
    e->obj = obj;
    return obj;
}

/* ---------------------------------------------------------------------------------------- */
/* One frame.                                                                                */

typedef struct {
    Int seq, time_ns, version;
    Span host_id, key, topic, state;
    int key_is_str;
    int txn_last;
} Fields;

/* Whether ``payload`` is a record array of the common shape continuing the chain. */
static int
parse(const uint8_t *payload, Py_ssize_t length, int64_t chain_seq, const uint8_t *chain_hash,
      Fields *f)
{
    Reader r = {payload, payload + length};
    uint32_t count;
    Span prev;
    if (!read_array_header(&r, &count) || count != RECORD_FIELDS) {
        return 0;
    }
    if (!read_int(&r, &f->seq) || f->seq.is_big || f->seq.value != chain_seq) {
        return 0;
    }
    if (!read_raw(&r, 0, &prev) || prev.len != HASH_SIZE ||
        memcmp(prev.data, chain_hash, HASH_SIZE) != 0) {
        return 0;
    }
    if (!read_raw(&r, 1, &f->host_id) || !read_int(&r, &f->time_ns)) {
        return 0;
    }
    if (r.p >= r.end || (*r.p != 0xc2 && *r.p != 0xc3)) {
        return 0;
    }
    f->txn_last = *r.p == 0xc3;
    r.p++;
    if (read_raw(&r, 0, &f->key)) {
        if (f->key.len != 16) {
            return 0; /* an aggregate id is a string or a UUID's 16 bytes */
        }
        f->key_is_str = 0;
    }
    else if (read_raw(&r, 1, &f->key)) {
        f->key_is_str = 1;
    }
    else {
        return 0;
    }
    if (!read_int(&r, &f->version) || !read_raw(&r, 1, &f->topic) ||
        !read_raw(&r, 0, &f->state)) {
        return 0;
    }
    return r.p == r.end; /* msgpack.unpackb refuses bytes after the value (ExtraData) */
}

/* Build the frame's Record; NULL with an exception set on a failure to allocate, NULL
 * without one when a string is not valid UTF-8 (the Python loop will see it again). */
static PyObject *
build_record(PyTypeObject *record_type, const Fields *f, const uint8_t *prev_hash,
             Cache *strings, Cache *keys)
{
    PyObject *items[RECORD_FIELDS] = {NULL};
    /* Each item is built only once the one before it was: no call with an exception set. */
    items[0] = PyLong_FromLongLong(f->seq.value);
    items[1] = items[0] ? PyBytes_FromStringAndSize((const char *)prev_hash, HASH_SIZE) : NULL;
    items[2] = items[1] ? cached(strings, f->host_id, 1) : NULL;
    items[3] = items[2] ? new_int(&f->time_ns) : NULL;
    items[4] = Py_NewRef(f->txn_last ? Py_True : Py_False);
    items[5] = items[3] ? cached(keys, f->key, f->key_is_str) : NULL;
    items[6] = items[5] ? new_int(&f->version) : NULL;
    items[7] = items[6] ? cached(strings, f->topic, 1) : NULL;
    items[8] = items[7] ? PyBytes_FromStringAndSize(f->state.data, f->state.len) : NULL;
    int complete = 1;
    for (int i = 0; i < RECORD_FIELDS; i++) {
        complete &= items[i] != NULL;
    }
    PyObject *record = NULL;
    if (complete) {
#if PY_VERSION_HEX < 0x030E0000
        /* As tuple.__new__(Record, fields) does (tuple_subtype_new), without the tuple of
         * fields in between. */
        record = record_type->tp_alloc(record_type, RECORD_FIELDS);
        if (record != NULL) {
            for (int i = 0; i < RECORD_FIELDS; i++) {
                PyTuple_SET_ITEM(record, i, items[i]); /* the record takes our reference */
                items[i] = NULL;
            }
        }
#else
        /* 3.14 tuples cache their hash in a field only CPython's own code may reset. */
        PyObject *fields = PyTuple_New(RECORD_FIELDS);
        if (fields != NULL) {
            for (int i = 0; i < RECORD_FIELDS; i++) {
                PyTuple_SET_ITEM(fields, i, items[i]);
                items[i] = NULL;
            }
            PyObject *args = PyTuple_Pack(1, fields);
            Py_DECREF(fields);
            if (args != NULL) {
                record = PyTuple_Type.tp_new(record_type, args, NULL);
                Py_DECREF(args);
            }
        }
#endif
    }
    for (int i = 0; i < RECORD_FIELDS; i++) {
        Py_XDECREF(items[i]);
    }
    if (record == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
    }
    return record;
}

/* ---------------------------------------------------------------------------------------- */

static int
as_hash(PyObject *obj, uint8_t out[HASH_SIZE])
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != HASH_SIZE) {
        return 0;
    }
    memcpy(out, PyBytes_AS_STRING(obj), HASH_SIZE);
    return 1;
}

PyDoc_STRVAR(scan_frames_doc,
"scan_frames(buf, pos, base, record_type, records, offsets, last, chain_seq, chain_hash,\n"
"            committed, end, good_seq, good_hash, digests=None, /)\n"
"--\n\n"
"Read the frames of the common shape from ``pos`` on, as engine.log.scan._scan's loop does,\n"
"appending to ``records`` and ``offsets``; stop before the first frame not of that shape.\n"
"``digests``: hash_frames(buf)[0], whose hashes are used instead of hashing the frames again.\n"
"Returns the loop's state after them: (pos, last, chain_seq, chain_hash, committed, end,\n"
"good_seq, good_hash).");

/* hash_frames() hands back, for each whole frame of a buffer from its start, the frame's
 * offset (a native Py_ssize_t) and its BLAKE2b-256: DIGEST_ENTRY bytes per frame. */
#define DIGEST_ENTRY ((Py_ssize_t)sizeof(Py_ssize_t) + HASH_SIZE)

/* The precomputed hash of the frame at ``pos`` when it is the ``index``-th entry of
 * ``digests``, else NULL (the caller hashes the frame itself). */
static const uint8_t *
digest_at(PyObject *digests, Py_ssize_t index, Py_ssize_t pos)
{
    if (digests == NULL || index >= PyBytes_GET_SIZE(digests) / DIGEST_ENTRY) {
        return NULL;
    }
    const uint8_t *entry = (const uint8_t *)PyBytes_AS_STRING(digests) + index * DIGEST_ENTRY;
    Py_ssize_t offset;
    memcpy(&offset, entry, sizeof offset);
    return offset == pos ? entry + sizeof offset : NULL;
}

static PyObject *
scan_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 13 && nargs != 14) {
        PyErr_Format(PyExc_TypeError, "scan_frames() takes 13 or 14 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    /* hash_frames(buf)[0], or None: the hash of each frame is looked up instead of computed
     * (the caller vouches that the digests are this very buffer's). */
    PyObject *digests = nargs == 14 && args[13] != Py_None ? args[13] : NULL;
    if (digests != NULL && !PyBytes_Check(digests)) {
        PyErr_SetString(PyExc_TypeError, "digests must be bytes or None");
        return NULL;
    }
    PyObject *buf_obj = args[0];
    PyObject *type_obj = args[3], *records = args[4], *offsets = args[5];
    PyObject *committed_obj = args[9], *end_obj = args[10];
    PyObject *good_seq_obj = args[11], *good_hash_obj = args[12];
    if (!PyBytes_Check(buf_obj)) {
        PyErr_SetString(PyExc_TypeError, "buf must be bytes");
        return NULL;
    }
    if (!PyType_Check(type_obj) || !PyType_IsSubtype((PyTypeObject *)type_obj, &PyTuple_Type) ||
        ((PyTypeObject *)type_obj)->tp_basicsize != PyTuple_Type.tp_basicsize ||
        ((PyTypeObject *)type_obj)->tp_itemsize != PyTuple_Type.tp_itemsize) {
        PyErr_SetString(PyExc_TypeError, "record_type must be a tuple subclass without fields");
        return NULL;
    }
    if (!PyList_CheckExact(records) || !PyList_CheckExact(offsets)) {
        PyErr_SetString(PyExc_TypeError, "records and offsets must be lists");
        return NULL;
    }
    PyTypeObject *record_type = (PyTypeObject *)type_obj;
    const uint8_t *buf = (const uint8_t *)PyBytes_AS_STRING(buf_obj);
    Py_ssize_t size = PyBytes_GET_SIZE(buf_obj);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t base = pos == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[2]);
    Py_ssize_t last = base == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[6]);
    if (last == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (pos < 0 || pos > size || base < 0) {
        PyErr_SetString(PyExc_ValueError, "pos must lie in buf and base must not be negative");
        return NULL;
    }
    int overflow;
    long long chain_seq = PyLong_AsLongLongAndOverflow(args[7], &overflow);
    if (chain_seq == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint8_t chain_hash[HASH_SIZE];
    int usable = !overflow && as_hash(args[8], chain_hash);

    Cache strings = {0}, keys = {0};
    Py_ssize_t start = pos;
    int txn_seen = 0;
    Py_ssize_t committed = 0, end = 0;
    long long good_seq = 0;
    uint8_t good_hash[HASH_SIZE];
    PyObject *result = NULL;
    while (usable && size - pos >= FRAME_HEADER_SIZE) {
        uint32_t length = be32(buf + pos);
        if (length > MAX_PAYLOAD || (Py_ssize_t)length > size - pos - FRAME_HEADER_SIZE) {
            break;
        }
        Fields f;
        const uint8_t *payload = buf + pos + FRAME_HEADER_SIZE;
        if (chain_seq == LLONG_MAX || !parse(payload, length, chain_seq, chain_hash, &f)) {
            break;
        }
        PyObject *record = build_record(record_type, &f, chain_hash, &strings, &keys);
        if (record == NULL) {
            if (PyErr_Occurred()) {
                goto done;
            }
            break;
        }
        int appended = PyList_Append(records, record);
        Py_DECREF(record);
        if (appended < 0) {
            goto done;
        }
        PyObject *offset = PyLong_FromSsize_t(base + pos);
        if (offset == NULL) {
            goto done;
        }
        appended = PyList_Append(offsets, offset);
        Py_DECREF(offset);
        if (appended < 0) {
            goto done;
        }
        chain_seq += 1;
        /* The frames read so far in this scan are the records listed: the digest of this one,
         * if computed ahead, is entry number len(records) - 1 (its offset is checked). */
        const uint8_t *ahead = digest_at(digests, PyList_GET_SIZE(records) - 1, pos);
        if (ahead != NULL) {
            memcpy(chain_hash, ahead, HASH_SIZE);
        }
        else {
            blake2b_256(buf + pos, FRAME_HEADER_SIZE + (size_t)length, chain_hash);
        }
        last = pos;
        pos += FRAME_HEADER_SIZE + (Py_ssize_t)length;
        if (f.txn_last) {
            txn_seen = 1;
            committed = PyList_GET_SIZE(records);
            end = base + pos;
            good_seq = chain_seq;
            memcpy(good_hash, chain_hash, HASH_SIZE);
        }
    }
    if (pos == start) {
        /* Nothing read: the state goes back as it came. */
        result = PyTuple_Pack(8, args[1], args[6], args[7], args[8], committed_obj, end_obj,
                              good_seq_obj, good_hash_obj);
    }
    else if (txn_seen) {
        result = Py_BuildValue("(nnLy#nnLy#)", pos, last, chain_seq, (const char *)chain_hash,
                               (Py_ssize_t)HASH_SIZE, committed, end, good_seq,
                               (const char *)good_hash, (Py_ssize_t)HASH_SIZE);
    }
    else {
        result = Py_BuildValue("(nnLy#OOOO)", pos, last, chain_seq, (const char *)chain_hash,
                               (Py_ssize_t)HASH_SIZE, committed_obj, end_obj, good_seq_obj,
                               good_hash_obj);
    }
done:
    cache_clear(&strings);
    cache_clear(&keys);
    return result;
}

/* How many frames of ``buf`` have lengths that fit it and the limit; ``end`` just past them. */
static Py_ssize_t
count_frames(const uint8_t *buf, Py_ssize_t size, Py_ssize_t *end)
{
    Py_ssize_t count = 0, pos = 0;
    while (size - pos >= FRAME_HEADER_SIZE) {
        uint32_t length = be32(buf + pos);
        if (length > MAX_PAYLOAD || (Py_ssize_t)length > size - pos - FRAME_HEADER_SIZE) {
            break;
        }
        count += 1;
        pos += FRAME_HEADER_SIZE + (Py_ssize_t)length;
    }
    *end = pos;
    return count;
}

/* The offset and hash of each of the ``count`` first frames of ``buf`` (count_frames()), into
 * ``out``: DIGEST_ENTRY bytes each. Needs no GIL. */
static void
hash_counted(const uint8_t *buf, Py_ssize_t count, uint8_t *out)
{
    Py_ssize_t pos = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t frame = FRAME_HEADER_SIZE + (size_t)be32(buf + pos);
        memcpy(out, &pos, sizeof pos);
        blake2b_256(buf + pos, frame, out + sizeof pos);
        out += DIGEST_ENTRY;
        pos += (Py_ssize_t)frame;
    }
}

PyDoc_STRVAR(hash_frames_doc,
"hash_frames(buf)\n"
"--\n\n"
"The BLAKE2b-256 of every whole frame of ``buf`` (bytes) from its start, computed with the\n"
"GIL released; it stops at the first frame whose length does not fit the buffer or the limit.\n"
"Returns (digests, end): digests holds each frame's offset and hash, for scan_frames();\n"
"end is the offset just past the last frame hashed.");

static PyObject *
hash_frames(PyObject *module, PyObject *buf_obj)
{
    if (!PyBytes_Check(buf_obj)) {
        PyErr_SetString(PyExc_TypeError, "buf must be bytes");
        return NULL;
    }
    const uint8_t *buf = (const uint8_t *)PyBytes_AS_STRING(buf_obj);
    Py_ssize_t end;
    /* Only the headers, to size the result, which must be allocated holding the GIL. */
    Py_ssize_t count = count_frames(buf, PyBytes_GET_SIZE(buf_obj), &end);
    PyObject *digests = PyBytes_FromStringAndSize(NULL, count * DIGEST_ENTRY);
    if (digests == NULL) {
        return NULL;
    }
    /* Without the GIL: a bytes object never changes, and our reference keeps it (and the new,
     * not yet shared, digests) alive until the GIL is ours again. */
    Py_INCREF(buf_obj);
    Py_BEGIN_ALLOW_THREADS
    hash_counted(buf, count, (uint8_t *)PyBytes_AS_STRING(digests));
    Py_END_ALLOW_THREADS
    Py_DECREF(buf_obj);
    return Py_BuildValue("(Nn)", digests, end);
}

#define MAX_CHUNKS 64

typedef struct {
    long long pos;
    Py_ssize_t asked, got, end, frames;
    PyObject *buf;    /* allocated holding the GIL, filled without it, nobody else's yet */
    uint8_t *digests; /* malloc'ed: allocated without the GIL */
} Chunk;

PyDoc_STRVAR(read_frames_doc,
"read_frames(fd, pos, size, chunk, count)\n"
"--\n\n"
"Read up to ``count`` chunks of a segment file and hash their frames, all with the GIL released\n"
"(a thread reading ahead then needs the GIL once per call, not twice per chunk). The first\n"
"chunk is the min(chunk, size - pos) bytes at ``pos``; each next one starts where the whole\n"
"frames of the one before end. It stops after a chunk read short, one without a whole frame,\n"
"or at ``size``. Returns a list of (pos, asked, buf, digests, end), digests and end as\n"
"hash_frames(buf) gives them; raises OSError only when the first read fails.");

static PyObject *
read_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "read_frames() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    long long pos = fd == -1 && PyErr_Occurred() ? -1 : PyLong_AsLongLong(args[1]);
    long long size = pos == -1 && PyErr_Occurred() ? -1 : PyLong_AsLongLong(args[2]);
    Py_ssize_t chunk = size == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[3]);
    Py_ssize_t count = chunk == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[4]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX || pos < 0 || chunk < 1 || count < 1 || count > MAX_CHUNKS) {
        PyErr_SetString(PyExc_ValueError, "read_frames: bad fd, pos, chunk or count");
        return NULL;
    }
    Chunk chunks[MAX_CHUNKS];
    memset(chunks, 0, sizeof chunks);
    /* Each chunk starts at or after ``pos``: none needs more than the first one's bytes. */
    Py_ssize_t most = size - pos < chunk ? (Py_ssize_t)(size - pos) : chunk;
    if (most <= 0) {
        return PyList_New(0);
    }
    PyObject *result = NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        chunks[k].buf = PyBytes_FromStringAndSize(NULL, most);
        if (chunks[k].buf == NULL) {
            goto done;
        }
    }
    Py_ssize_t read = 0;
    int error = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < count && pos < size; k++) {
        Chunk *c = &chunks[k];
        uint8_t *buf = (uint8_t *)PyBytes_AS_STRING(c->buf);
        c->pos = pos;
        c->asked = size - pos < chunk ? (Py_ssize_t)(size - pos) : chunk;
        while (c->got < c->asked) {
            ssize_t n = pread((int)fd, buf + c->got, (size_t)(c->asked - c->got), (off_t)(pos + c->got));
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n <= 0) {
                error = n < 0 ? errno : 0;
                break;
            }
            c->got += n;
        }
        if (error) {
            break;
        }
        c->frames = count_frames(buf, c->got, &c->end);
        c->digests = malloc(c->frames > 0 ? (size_t)(c->frames * DIGEST_ENTRY) : 1);
        if (c->digests == NULL) {
            error = ENOMEM;
            break;
        }
        hash_counted(buf, c->frames, c->digests);
        read = k + 1;
        if (c->got < c->asked || c->end == 0) {
            break;
        }
        pos += c->end;
    }
    Py_END_ALLOW_THREADS
    if (read == 0 && error) {
        errno = error;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyList_New(read);
    for (Py_ssize_t k = 0; result != NULL && k < read; k++) {
        Chunk *c = &chunks[k];
        PyObject *digests = PyBytes_FromStringAndSize((const char *)c->digests,
                                                      c->frames * DIGEST_ENTRY);
        if (digests == NULL || (c->got < most && _PyBytes_Resize(&c->buf, c->got) < 0)) {
            Py_XDECREF(digests);
            Py_CLEAR(result);
            break;
        }
        PyObject *item = Py_BuildValue("(LnNNn)", c->pos, c->asked, c->buf, digests, c->end);
        c->buf = NULL; /* stolen by the tuple, or released when building it failed */
        if (item == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, item);
    }
done:
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_XDECREF(chunks[k].buf);
        free(chunks[k].digests);
    }
    return result;
}

/* ---------------------------------------------------------------------------------------- */
/* Writing: one group commit's frames (engine/log/batch.py's frame_batch is the reference).  */

/* zlib's CRC-32 (reflected, polynomial 0xEDB88320), sliced by 8; the table is built at the
 * first call. Written out here rather than linked from libz so that setup.py stays one line
 * per extension; tests compare it with zlib.crc32. */
static uint32_t crc_table[8][256];
static int crc_ready = 0;

static void
crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        for (int t = 1; t < 8; t++) {
            crc_table[t][n] = (crc_table[t - 1][n] >> 8) ^ crc_table[0][crc_table[t - 1][n] & 0xff];
        }
    }
    crc_ready = 1;
}

static uint32_t
crc32_of(const uint8_t *p, size_t len)
{
    uint32_t c = 0xFFFFFFFFu;
    while (len >= 8) {
        c ^= (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
        c = crc_table[7][c & 0xff] ^ crc_table[6][(c >> 8) & 0xff] ^
            crc_table[5][(c >> 16) & 0xff] ^ crc_table[4][c >> 24] ^ crc_table[3][p[4]] ^
            crc_table[2][p[5]] ^ crc_table[1][p[6]] ^ crc_table[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len--) {
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    }
    return c ^ 0xFFFFFFFFu;
}

typedef struct {
    uint8_t *data;
    size_t len, cap;
} Buf;

static int
buf_reserve(Buf *b, size_t more)
{
    if (b->len + more <= b->cap) {
        return 1;
    }
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        cap *= 2;
    }
    uint8_t *data = realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    b->data = data;
    b->cap = cap;
    return 1;
}

static inline void
put_be16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void
put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void
put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

/* An int as msgpack-python's Packer writes it: a positive one as the smallest unsigned form,
 * zero or a negative one as the smallest signed one. 0 (nothing written) when it does not fit
 * 64 bits: the caller lets the Packer raise its own error. */
static int
pack_int(Buf *b, PyObject *o)
{
    uint8_t *p;
    if (!buf_reserve(b, 9)) {
        return -1;
    }
    p = b->data + b->len;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow < 0) {
        return 0;
    }
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        p[0] = 0xcf;
        put_be64(p + 1, u);
        b->len += 9;
        return 1;
    }
    if (v >= 0) {
        if (v < 128) {
            p[0] = (uint8_t)v;
            b->len += 1;
        }
        else if (v < 256) {
            p[0] = 0xcc;
            p[1] = (uint8_t)v;
            b->len += 2;
        }
        else if (v < 65536) {
            p[0] = 0xcd;
            put_be16(p + 1, (uint32_t)v);
            b->len += 3;
        }
        else if (v < 4294967296LL) {
            p[0] = 0xce;
            put_be32(p + 1, (uint32_t)v);
            b->len += 5;
        }
        else {
            p[0] = 0xcf;
            put_be64(p + 1, (uint64_t)v);
            b->len += 9;
        }
    }
    else if (v >= -32) {
        p[0] = (uint8_t)(int8_t)v;
        b->len += 1;
    }
    else if (v >= -128) {
        p[0] = 0xd0;
        p[1] = (uint8_t)(int8_t)v;
        b->len += 2;
    }
    else if (v >= -32768) {
        p[0] = 0xd1;
        put_be16(p + 1, (uint32_t)(uint16_t)(int16_t)v);
        b->len += 3;
    }
    else if (v >= -2147483648LL) {
        p[0] = 0xd2;
        put_be32(p + 1, (uint32_t)(int32_t)v);
        b->len += 5;
    }
    else {
        p[0] = 0xd3;
        put_be64(p + 1, (uint64_t)v);
        b->len += 9;
    }
    return 1;
}

/* str (is_str) or bin of ``len`` bytes, with msgpack's smallest header (use_bin_type=True). */
static int
pack_raw(Buf *b, const char *data, Py_ssize_t len, int is_str)
{
    if ((uint64_t)len > 0xFFFFFFFFu) {
        return 0;
    }
    if (!buf_reserve(b, 5 + (size_t)len)) {
        return -1;
    }
    uint8_t *p = b->data + b->len;
    size_t head;
    if (is_str && len < 32) {
        p[0] = (uint8_t)(0xa0 | len);
        head = 1;
    }
    else if (len < 256) {
        p[0] = is_str ? 0xd9 : 0xc4;
        p[1] = (uint8_t)len;
        head = 2;
    }
    else if (len < 65536) {
        p[0] = is_str ? 0xda : 0xc5;
        put_be16(p + 1, (uint32_t)len);
        head = 3;
    }
    else {
        p[0] = is_str ? 0xdb : 0xc6;
        put_be32(p + 1, (uint32_t)len);
        head = 5;
    }
    memcpy(p + head, data, (size_t)len);
    b->len += head + (size_t)len;
    return 1;
}

static int
pack_str(Buf *b, PyObject *o)
{
    Py_ssize_t len;
    const char *data = PyUnicode_AsUTF8AndSize(o, &len);
    if (data == NULL) { /* e.g. a lone surrogate: the Packer raises its own error */
        PyErr_Clear();
        return 0;
    }
    return pack_raw(b, data, len, 1);
}

/* The payload of one record, appended to ``b``: 1 when written here, 0 when a field is not of
 * the common types (exact int, str, bytes) and the Packer must write it, -1 on an error. */
static int
pack_record(Buf *b, PyObject *const *fields)
{
    if (!buf_reserve(b, 1)) {
        return -1;
    }
    b->data[b->len++] = 0x99; /* fixarray of 9 */
    for (int k = 0; k < RECORD_FIELDS; k++) {
        PyObject *o = fields[k];
        int r;
        if (o == Py_True || o == Py_False) {
            if (!buf_reserve(b, 1)) {
                return -1;
            }
            b->data[b->len++] = o == Py_True ? 0xc3 : 0xc2;
            continue;
        }
        if (PyLong_CheckExact(o)) {
            r = pack_int(b, o);
        }
        else if (PyUnicode_CheckExact(o)) {
            r = pack_str(b, o);
        }
        else if (PyBytes_CheckExact(o)) {
            r = pack_raw(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o), 0);
        }
        else {
            r = 0;
        }
        if (r != 1) {
            return r;
        }
    }
    return 1;
}

/* uuid.UUID(...).bytes, for an exact UUID without running its property: int.to_bytes(16). */
static PyObject *
uuid_bytes(PyObject *oid, PyObject *uuid_type)
{
    if (Py_TYPE(oid) == (PyTypeObject *)uuid_type) {
        PyObject *value = PyObject_GetAttrString(oid, "int");
        if (value == NULL) {
            return NULL;
        }
        uint8_t out[16];
        int r = PyLong_Check(value) ? _PyLong_AsByteArray((PyLongObject *)value, out, 16, 0, 0)
                                    : -1;
        Py_DECREF(value);
        if (r == 0) {
            return PyBytes_FromStringAndSize((const char *)out, 16);
        }
        PyErr_Clear(); /* let the property say what is wrong */
    }
    return PyObject_GetAttrString(oid, "bytes");
}

static PyObject *one, *str_payload, *str_error, *str_originator_id, *str_originator_version,
    *str_topic, *str_state;

static int
intern_names(void)
{
    if (str_state != NULL) {
        return 1;
    }
    one = PyLong_FromLong(1);
    str_payload = PyUnicode_InternFromString("payload");
    str_error = PyUnicode_InternFromString("error");
    str_originator_id = PyUnicode_InternFromString("originator_id");
    str_originator_version = PyUnicode_InternFromString("originator_version");
    str_topic = PyUnicode_InternFromString("topic");
    str_state = PyUnicode_InternFromString("state");
    return one && str_payload && str_error && str_originator_id && str_originator_version && str_topic &&
           str_state;
}

PyDoc_STRVAR(frame_batch_doc,
"frame_batch(batch, seq, prev, base, host_id, now, versions, pack, uuid_type, conflict,\n"
"            too_big, /)\n"
"--\n\n"
"engine.log.batch.frame_batch's loop in C: returns (out, offsets, accepted, next_seq,\n"
"last_hash). ``versions`` must be a dict; a refused request is handed to\n"
"``conflict(request, originator_id, current, attempted)`` or ``too_big(request, length)``,\n"
"which set its error. A record with a field of another type than the common ones is packed\n"
"by calling ``pack``, so the bytes are always the Packer's.");

static PyObject *
frame_batch_c(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "frame_batch() takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *batch = args[0], *prev = args[2], *host_id = args[4], *now = args[5];
    PyObject *versions = args[6], *pack = args[7], *uuid_type = args[8];
    PyObject *conflict = args[9], *too_big = args[10];
    if (!PyList_Check(batch) || !PyDict_Check(versions) || !PyType_Check(uuid_type)) {
        PyErr_SetString(PyExc_TypeError, "batch must be a list, versions a dict");
        return NULL;
    }
    Py_ssize_t base = PyLong_AsSsize_t(args[3]);
    if (base == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!intern_names()) {
        return NULL;
    }
    if (!crc_ready) {
        crc_init();
    }
    Buf out = {0}, payload = {0};
    PyObject *offsets = PyList_New(0), *accepted = PyList_New(0), *claimed = PyDict_New();
    PyObject *seq = Py_NewRef(args[1]);
    Py_INCREF(prev);
    PyObject *result = NULL;
    if (offsets == NULL || accepted == NULL || claimed == NULL) {
        goto done;
    }
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(batch); r++) {
        PyObject *request = PyList_GET_ITEM(batch, r);
        PyObject *events_obj = PyObject_GetAttr(request, str_payload);
        if (events_obj == NULL) {
            goto done;
        }
        PyObject *events = PySequence_Fast(events_obj, "a request's payload must be a sequence");
        Py_DECREF(events_obj);
        if (events == NULL) {
            goto done;
        }
        PyObject *first = Py_NewRef(seq), *mark_prev = Py_NewRef(prev);
        size_t mark = out.len;
        Py_ssize_t offsets_mark = PyList_GET_SIZE(offsets);
        PyObject *claims = PyList_New(0);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(events);
        int failed = claims == NULL, refused = 0;
        for (Py_ssize_t i = 0; i < n && !failed && !refused; i++) {
            PyObject *event = PySequence_Fast_GET_ITEM(events, i);
            PyObject *oid = NULL, *key = NULL, *version = NULL, *topic = NULL, *state = NULL;
            PyObject *current = NULL, *packed = NULL;
            failed = 1;
            oid = PyObject_GetAttr(event, str_originator_id);
            if (oid == NULL) {
                goto event_done;
            }
            int is_uuid = PyObject_IsInstance(oid, uuid_type);
            if (is_uuid < 0) {
                goto event_done;
            }
            key = is_uuid ? uuid_bytes(oid, uuid_type) : Py_NewRef(oid);
            if (key == NULL || (version = PyObject_GetAttr(event, str_originator_version)) == NULL) {
                goto event_done;
            }
            PyObject *earlier = PyDict_GetItemWithError(claimed, key); /* borrowed */
            if (earlier == NULL && PyErr_Occurred()) {
                goto event_done;
            }
            if (earlier != NULL) {
                current = Py_NewRef(earlier);
            }
            else {
                PyObject *entry = PyDict_GetItemWithError(versions, key);
                if (entry == NULL && PyErr_Occurred()) {
                    goto event_done;
                }
                current = entry == NULL ? Py_NewRef(Py_None) : PySequence_GetItem(entry, 0);
                if (current == NULL) {
                    goto event_done;
                }
            }
            if (current != Py_None) {
                PyObject *next = PyNumber_Add(current, one);
                int differs = next == NULL ? -1 : PyObject_RichCompareBool(version, next, Py_NE);
                Py_XDECREF(next);
                if (differs < 0) {
                    goto event_done;
                }
                if (differs) {
                    PyObject *done_ = PyObject_CallFunctionObjArgs(conflict, request, oid,
                                                                   current, version, NULL);
                    if (done_ == NULL) {
                        goto event_done;
                    }
                    Py_DECREF(done_);
                    refused = 1;
                    failed = 0;
                    goto event_done;
                }
            }
            {
                PyObject *claim = PyTuple_Pack(3, key, version, earlier ? earlier : Py_None);
                if (claim == NULL) {
                    goto event_done;
                }
                int ok = PyDict_SetItem(claimed, key, version) == 0 &&
                         PyList_Append(claims, claim) == 0;
                Py_DECREF(claim);
                if (!ok) {
                    goto event_done;
                }
            }
            if ((topic = PyObject_GetAttr(event, str_topic)) == NULL ||
                (state = PyObject_GetAttr(event, str_state)) == NULL) {
                goto event_done;
            }
            PyObject *fields[RECORD_FIELDS] = {
                seq, prev, host_id, now, i == n - 1 ? Py_True : Py_False, key, version, topic,
                state,
            };
            payload.len = 0;
            int written = pack_record(&payload, fields);
            if (written < 0) {
                goto event_done;
            }
            const uint8_t *data = payload.data;
            size_t length = payload.len;
            if (written == 0) { /* the Packer's own bytes, or its own error */
                PyObject *list = PyList_New(RECORD_FIELDS);
                if (list == NULL) {
                    goto event_done;
                }
                for (int k = 0; k < RECORD_FIELDS; k++) {
                    PyList_SET_ITEM(list, k, Py_NewRef(fields[k]));
                }
                packed = PyObject_CallOneArg(pack, list);
                Py_DECREF(list);
                if (packed == NULL) {
                    goto event_done;
                }
                if (!PyBytes_Check(packed)) {
                    PyErr_SetString(PyExc_TypeError, "pack must return bytes");
                    goto event_done;
                }
                data = (const uint8_t *)PyBytes_AS_STRING(packed);
                length = (size_t)PyBytes_GET_SIZE(packed);
            }
            if (length > MAX_PAYLOAD) { /* refused alone, like a conflict */
                PyObject *done_ = PyObject_CallFunction(too_big, "On", request, (Py_ssize_t)length);
                if (done_ == NULL) {
                    goto event_done;
                }
                Py_DECREF(done_);
                refused = 1;
                failed = 0;
                goto event_done;
            }
            if (!buf_reserve(&out, FRAME_HEADER_SIZE + length)) {
                goto event_done;
            }
            {
                uint8_t *frame = out.data + out.len;
                put_be32(frame, (uint32_t)length);
                put_be32(frame + 4, crc32_of(data, length));
                put_be32(frame + 8, crc32_of(frame, 8));
                memcpy(frame + FRAME_HEADER_SIZE, data, length);
                PyObject *offset = PyLong_FromSsize_t(base + (Py_ssize_t)out.len);
                if (offset == NULL) {
                    goto event_done;
                }
                int appended = PyList_Append(offsets, offset);
                Py_DECREF(offset);
                if (appended < 0) {
                    goto event_done;
                }
                uint8_t digest[HASH_SIZE];
                blake2b_256(frame, FRAME_HEADER_SIZE + length, digest);
                out.len += FRAME_HEADER_SIZE + length;
                PyObject *next_seq = PyNumber_Add(seq, one);
                PyObject *next_prev = PyBytes_FromStringAndSize((const char *)digest, HASH_SIZE);
                if (next_seq == NULL || next_prev == NULL) {
                    Py_XDECREF(next_seq);
                    Py_XDECREF(next_prev);
                    goto event_done;
                }
                Py_SETREF(seq, next_seq);
                Py_SETREF(prev, next_prev);
            }
            failed = 0;
        event_done:
            Py_XDECREF(oid);
            Py_XDECREF(key);
            Py_XDECREF(version);
            Py_XDECREF(topic);
            Py_XDECREF(state);
            Py_XDECREF(current);
            Py_XDECREF(packed);
        }
        Py_DECREF(events);
        if (!failed) {
            PyObject *error = PyObject_GetAttr(request, str_error);
            if (error == NULL) {
                failed = 1;
            }
            else {
                refused = error != Py_None;
                Py_DECREF(error);
            }
        }
        if (!failed && refused) { /* drop its records and its claims */
            out.len = mark;
            failed = PyList_SetSlice(offsets, offsets_mark, PyList_GET_SIZE(offsets), NULL) < 0;
            for (Py_ssize_t c = PyList_GET_SIZE(claims) - 1; c >= 0 && !failed; c--) {
                PyObject *claim = PyList_GET_ITEM(claims, c);
                PyObject *key = PyTuple_GET_ITEM(claim, 0), *earlier = PyTuple_GET_ITEM(claim, 2);
                failed = (earlier == Py_None ? PyDict_DelItem(claimed, key)
                                             : PyDict_SetItem(claimed, key, earlier)) < 0;
            }
            Py_SETREF(seq, Py_NewRef(first));
            Py_SETREF(prev, Py_NewRef(mark_prev));
        }
        else if (!failed) {
            PyObject *item = PyTuple_Pack(3, request, first, claims);
            failed = item == NULL || PyList_Append(accepted, item) < 0;
            Py_XDECREF(item);
        }
        Py_DECREF(first);
        Py_DECREF(mark_prev);
        Py_XDECREF(claims);
        if (failed) {
            goto done;
        }
    }
    {
        PyObject *framed = PyByteArray_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.len);
        if (framed != NULL) {
            result = Py_BuildValue("NOOOO", framed, offsets, accepted, seq, prev);
        }
    }
done:
    free(out.data);
    free(payload.data);
    Py_XDECREF(offsets);
    Py_XDECREF(accepted);
    Py_XDECREF(claimed);
    Py_DECREF(seq);
    Py_DECREF(prev);
    return result;
}

PyDoc_STRVAR(index_batch_doc,
"index_batch(accepted, aggregates, /)\n"
"--\n\n"
"engine.log.store.OperationLog._write_batch's index update in C: for each (request, first,\n"
"claims) of ``accepted``, give each claim the next sequence number from ``first``, record it\n"
"in ``aggregates`` (key -> [last version, seqs]) and set the request's ``seqs``.");

static PyObject *str_seqs;

static PyObject *
index_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "index_batch(accepted: list, aggregates: dict)");
        return NULL;
    }
    if (!intern_names() ||
        (str_seqs == NULL && (str_seqs = PyUnicode_InternFromString("seqs")) == NULL)) {
        return NULL;
    }
    PyObject *accepted = args[0], *aggregates = args[1];
    for (Py_ssize_t a = 0; a < PyList_GET_SIZE(accepted); a++) {
        PyObject *item = PyList_GET_ITEM(accepted, a);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 ||
            !PyList_Check(PyTuple_GET_ITEM(item, 2))) {
            PyErr_SetString(PyExc_TypeError, "accepted: (request, first, claims) tuples");
            return NULL;
        }
        PyObject *request = PyTuple_GET_ITEM(item, 0), *claims = PyTuple_GET_ITEM(item, 2);
        PyObject *first = PyTuple_GET_ITEM(item, 1);
        Py_ssize_t count = PyList_GET_SIZE(claims);
        PyObject *seqs = PyList_New(count);
        if (seqs == NULL) {
            return NULL;
        }
        for (Py_ssize_t j = 0; j < count; j++) {
            PyObject *claim = PyList_GET_ITEM(claims, j);
            /* first + j, with Python's ints (no bound on a sequence number here) */
            PyObject *n = j == 0 ? Py_NewRef(first)
                                 : PyNumber_Add(PyList_GET_ITEM(seqs, j - 1), one);
            if (n == NULL) {
                Py_DECREF(seqs);
                return NULL;
            }
            PyList_SET_ITEM(seqs, j, n);
            if (!PyTuple_Check(claim) || PyTuple_GET_SIZE(claim) != 3) {
                PyErr_SetString(PyExc_TypeError, "claims: (key, version, earlier) tuples");
                Py_DECREF(seqs);
                return NULL;
            }
            PyObject *key = PyTuple_GET_ITEM(claim, 0), *version = PyTuple_GET_ITEM(claim, 1);
            PyObject *entry = PyDict_GetItemWithError(aggregates, key); /* borrowed */
            int failed;
            if (entry == NULL) {
                PyObject *list = PyErr_Occurred() ? NULL : PyList_New(1);
                PyObject *new_entry = list == NULL ? NULL : PyList_New(2);
                if (new_entry != NULL) {
                    PyList_SET_ITEM(list, 0, Py_NewRef(n));
                    PyList_SET_ITEM(new_entry, 0, Py_NewRef(version));
                    PyList_SET_ITEM(new_entry, 1, list);
                    list = NULL;
                }
                Py_XDECREF(list);
                failed = new_entry == NULL || PyDict_SetItem(aggregates, key, new_entry) < 0;
                Py_XDECREF(new_entry);
            }
            else if (PyList_CheckExact(entry) && PyList_GET_SIZE(entry) == 2 &&
                     PyList_CheckExact(PyList_GET_ITEM(entry, 1))) {
                Py_INCREF(version);
                failed = PyList_SetItem(entry, 0, version) < 0 ||
                         PyList_Append(PyList_GET_ITEM(entry, 1), n) < 0;
            }
            else {
                PyErr_SetString(PyExc_TypeError, "aggregates: key -> [version, seqs] lists");
                failed = 1;
            }
            if (failed) {
                Py_DECREF(seqs);
                return NULL;
            }
        }
        int set = PyObject_SetAttr(request, str_seqs, seqs);
        Py_DECREF(seqs);
        if (set < 0) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(crc32_doc,
"crc32(data)\n"
"--\n\n"
"CRC-32 of ``data`` as zlib.crc32(data); for tests.");

static PyObject *
py_crc32(PyObject *module, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (!crc_ready) {
        crc_init();
    }
    uint32_t c = crc32_of(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

PyDoc_STRVAR(blake2b_256_doc,
"blake2b_256(data)\n"
"--\n\n"
"BLAKE2b-256 of ``data`` (bytes), as hashlib.blake2b(data, digest_size=32).digest(); for tests.");

static PyObject *
py_blake2b_256(PyObject *module, PyObject *data)
{
    Py_buffer view;
    uint8_t out[HASH_SIZE];
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    blake2b_256(view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, HASH_SIZE);
}

static PyMethodDef fastscan_methods[] = {
    {"scan_frames", (PyCFunction)(void (*)(void))scan_frames, METH_FASTCALL, scan_frames_doc},
    {"hash_frames", hash_frames, METH_O, hash_frames_doc},
    {"read_frames", (PyCFunction)(void (*)(void))read_frames, METH_FASTCALL, read_frames_doc},
    {"blake2b_256", py_blake2b_256, METH_O, blake2b_256_doc},
    {"frame_batch", (PyCFunction)(void (*)(void))frame_batch_c, METH_FASTCALL, frame_batch_doc},
    {"index_batch", (PyCFunction)(void (*)(void))index_batch, METH_FASTCALL, index_batch_doc},
    {"crc32", py_crc32, METH_O, crc32_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastscan_module = {
    PyModuleDef_HEAD_INIT,
    "engine.log._fastscan",
    "The log scanner's fast path in C; engine/log/scan.py is the reference.",
    0,
    fastscan_methods,
};

PyMODINIT_FUNC
PyInit__fastscan(void)
{
    return PyModuleDef_Init(&fastscan_module);
}
