/* A batch of log records turned into domain events in C (engine/projections/log_events.py).
 *
 * ReplayMapper.record_event is the reference: decode the record's state, set its originator id
 * and version, drop its class_version, and make the event without calling its __init__. For a
 * record of the common kind (a UUID id, a topic already resolved to a class whose id needs no
 * conversion, state at the class's current version), the Python steps around the decoding cost
 * about as much as the decoding itself, most of it calls and attribute lookups; here they cost
 * next to nothing. Every other record (a string id, a topic not seen yet, state to upcast, state
 * that does not decode or is not a map) is left as None for the Python code to do, which also
 * raises the errors. So both give the same events by construction.
 *
 * Record is a NamedTuple: (seq, prev_hash, host_id, time_ns, txn_last, originator_key,
 * originator_version, topic, state).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define RECORD_FIELDS 9
#define KEY 5
#define VERSION 6
#define TOPIC 7
#define STATE 8

static PyObject *str_originator_id, *str_originator_version, *str_class_version, *str_dict;
static PyObject *one, *empty_tuple;

/* The event for one record, Py_None to leave it to Python, or NULL with an exception set. */
static PyObject *
build_one(PyObject *record, PyObject *known, PyObject *decode, PyObject *uuids, PyObject *id_of)
{
    if (!PyTuple_Check(record) || PyTuple_GET_SIZE(record) != RECORD_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "a log Record expected");
        return NULL;
    }
    PyObject *key = PyTuple_GET_ITEM(record, KEY);
    if (!PyBytes_CheckExact(key)) {
        Py_RETURN_NONE; /* an id that is not a UUID */
    }
    PyObject *cls_version = PyDict_GetItemWithError(known, PyTuple_GET_ITEM(record, TOPIC));
    if (cls_version == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE; /* a topic Python has not resolved yet */
    }
    if (!PyTuple_CheckExact(cls_version) || PyTuple_GET_SIZE(cls_version) != 2 ||
        !PyType_Check(PyTuple_GET_ITEM(cls_version, 0))) {
        PyErr_SetString(PyExc_TypeError, "known: topic -> (class, class_version)");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)PyTuple_GET_ITEM(cls_version, 0);
    PyObject *class_version = PyTuple_GET_ITEM(cls_version, 1);

    PyObject *state = PyObject_CallOneArg(decode, PyTuple_GET_ITEM(record, STATE));
    if (state == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            return NULL; /* KeyboardInterrupt, SystemExit: not the record's fault */
        }
        PyErr_Clear(); /* Python decodes it again and words the error */
        Py_RETURN_NONE;
    }
    PyObject *event = NULL;
    if (!PyDict_CheckExact(state)) {
        event = Py_NewRef(Py_None);
        goto done;
    }
    /* The state's version, as state.pop("class_version", 1) gives it: upcasting is Python's. */
    PyObject *version = PyDict_GetItemWithError(state, str_class_version);
    if (version == NULL && PyErr_Occurred()) {
        goto done;
    }
    if (version != NULL && !PyLong_CheckExact(version)) {
        event = Py_NewRef(Py_None);
        goto done;
    }
    int behind = PyObject_RichCompareBool(version ? version : one, class_version, Py_LT);
    if (behind != 0) {
        if (behind > 0) {
            event = Py_NewRef(Py_None);
        }
        goto done;
    }
    if (version != NULL && PyDict_DelItem(state, str_class_version) < 0) {
        goto done;
    }
    PyObject *uuid = PyDict_GetItemWithError(uuids, key); /* borrowed */
    PyObject *made = NULL;
    if (uuid == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        uuid = made = PyObject_CallOneArg(id_of, key); /* it also fills the cache */
        if (made == NULL) {
            goto done;
        }
    }
    int failed = PyDict_SetItem(state, str_originator_id, uuid) < 0 ||
                 PyDict_SetItem(state, str_originator_version,
                                PyTuple_GET_ITEM(record, VERSION)) < 0;
    Py_XDECREF(made);
    if (failed) {
        goto done;
    }
    /* object.__new__(cls), then object.__setattr__(event, "__dict__", state): a frozen
     * dataclass's own __setattr__ refuses. */
    PyObject *made_event = PyBaseObject_Type.tp_new(cls, empty_tuple, NULL);
    if (made_event == NULL) {
        goto done;
    }
    if (PyObject_GenericSetAttr(made_event, str_dict, state) < 0) {
        Py_DECREF(made_event);
        goto done;
    }
    event = made_event;
done:
    Py_DECREF(state);
    return event;
}

static PyObject *
build_events(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "build_events(records, known, decode, uuids, id_of) takes 5 arguments");
        return NULL;
    }
    PyObject *records = args[0], *known = args[1], *decode = args[2], *uuids = args[3],
             *id_of = args[4];
    if (!PyList_CheckExact(records) || !PyDict_CheckExact(known) || !PyDict_CheckExact(uuids)) {
        PyErr_SetString(PyExc_TypeError, "records: list, known: dict, uuids: dict");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *events = PyList_New(n);
    PyObject *missed = PyList_New(0);
    if (events == NULL || missed == NULL) {
        goto fail;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records) && i < n; i++) {
        PyObject *event = build_one(PyList_GET_ITEM(records, i), known, decode, uuids, id_of);
        if (event == NULL) {
            goto fail;
        }
        if (event == Py_None) {
            PyObject *index = PyLong_FromSsize_t(i);
            int failed = index == NULL || PyList_Append(missed, index) < 0;
            Py_XDECREF(index);
            if (failed) {
                Py_DECREF(event);
                goto fail;
            }
        }
        PyList_SET_ITEM(events, i, event);
    }
    if (PyList_GET_SIZE(records) != n) {
        PyErr_SetString(PyExc_RuntimeError, "records changed size while being decoded");
        goto fail;
    }
    PyObject *result = PyTuple_Pack(2, events, missed);
    Py_DECREF(events);
    Py_DECREF(missed);
    return result;
fail:
    /* A list made by PyList_New holds NULLs where nothing was set yet: its dealloc skips them. */
    Py_XDECREF(events);
    Py_XDECREF(missed);
    return NULL;
}

PyDoc_STRVAR(build_events_doc,
             "build_events(records, known, decode, uuids, id_of) -> (events, missed)\n\n"
             "Each record's event, as ReplayMapper.record_event makes it, for records with a\n"
             "UUID key whose topic is in known (topic -> (class, class_version)) and whose\n"
             "state needs no upcasting; None at the indexes listed in missed, for Python.\n"
             "decode: bytes -> state; uuids: the id cache (key -> UUID), id_of(key) on a miss.");

static PyMethodDef module_methods[] = {
    {"build_events", (PyCFunction)(void (*)(void))build_events, METH_FASTCALL, build_events_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_fastevents", "Log records turned into domain events, in C.", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__fastevents(void)
{
    str_originator_id = PyUnicode_InternFromString("originator_id");
    str_originator_version = PyUnicode_InternFromString("originator_version");
    str_class_version = PyUnicode_InternFromString("class_version");
    str_dict = PyUnicode_InternFromString("__dict__");
    one = PyLong_FromLong(1);
    empty_tuple = PyTuple_New(0);
    if (str_originator_id == NULL || str_originator_version == NULL ||
        str_class_version == NULL || str_dict == NULL || one == NULL || empty_tuple == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
