/* A frame's payload of the one common shape, read into a Record: the msgpack subset of the
 * record array, and the objects built from it (docs/adr/0008). engine/log/framing.py's
 * decode_payload and engine/log/scan.py's loop are the reference: only what they accept is
 * accepted here, and the same objects are built for it.
 */

#include "payload.h"

#include <string.h>

/* The msgpack subset of a record payload. */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Reader;


static inline uint32_t
be16(const uint8_t *p)
{
    return ((uint32_t)p[0] << 8) | p[1];
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

/* Objects that repeat from record to record: see Cache in payload.h. */

void
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

/* One frame. */

int
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

PyObject *
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
