/* Reading a segment's next chunks and hashing their frames without the GIL, for the thread of
 * engine/log/read_ahead.py (docs/adr/0009-hash-the-log-ahead-in-a-second-thread.md).
 *
 * The module engine.log._readahead. The digests it hands back (layout in frames.h) let
 * engine.log._fastscan.scan_frames() take a frame's hash instead of computing it; the scan's
 * result is the same with or without them.
 */

#include "frames.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
"Returns (digests, end): digests holds each frame's offset and hash (frames.h), for\n"
"engine.log._fastscan.scan_frames(); end is the offset just past the last frame hashed.");

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

static PyMethodDef readahead_methods[] = {
    {"hash_frames", hash_frames, METH_O, hash_frames_doc},
    {"read_frames", (PyCFunction)(void (*)(void))read_frames, METH_FASTCALL, read_frames_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef readahead_module = {
    PyModuleDef_HEAD_INIT,
    "engine.log._readahead",
    "Reading and hashing a log's frames ahead, without the GIL; engine/log/read_ahead.py.",
    0,
    readahead_methods,
};

PyMODINIT_FUNC
PyInit__readahead(void)
{
    return PyModuleDef_Init(&readahead_module);
}
