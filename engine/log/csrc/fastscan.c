/* The log scanner's fast path: the frames of the one common shape, read in C.
 *
 * See docs/adr/0008-compiled-fast-path-for-the-log-scanner.md. engine/log/scan.py is the
 * reference: its loop calls scan_frames() first, which reads as many frames as it is sure
 * about, exactly as the Python loop would read them, and stops *before* the first frame it is
 * not sure about. The Python loop then reads that frame as it always has (every edge case,
 * damage and torn tails stay in Python) and calls scan_frames() again after it. So this file
 * may only ever accept a frame the Python loop accepts, and must build the very same objects.
 *
 * The module engine.log._fastscan: this file is its loop; a frame's layout is in frames.h, what
 * "the common shape" is in payload.h/payload.c, its hash in blake2b.c. Like the Python loop,
 * no checksum is read: the next record's prev_hash vouches for every frame, and scan.py checks
 * the last frame's checksums itself.
 */

#include "payload.h"

#include <limits.h>
#include <string.h>

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
"``digests``: engine.log._readahead.hash_frames(buf)[0], whose hashes are used instead of\n"
"hashing the frames again.\n"
"Returns the loop's state after them: (pos, last, chain_seq, chain_hash, committed, end,\n"
"good_seq, good_hash).");

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
    {"blake2b_256", py_blake2b_256, METH_O, blake2b_256_doc},
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
