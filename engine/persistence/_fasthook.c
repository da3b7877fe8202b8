/* The msgpack transcoder's object hook in C (engine/persistence/transcoder.py).
 *
 * msgpack calls the hook for every map it decodes: some three per event, a million calls in a
 * replay of a large log. Nearly all of them are plain maps, returned as they are; a map that is
 * exactly {"_type_": name, "_data_": data} with a registered name becomes decoders[name](data).
 * Every other case (an unknown or unhashable name, a name that is not a str) goes to the Python
 * hook, which raises the library's error, so both hooks give the same results by construction.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *type_key; /* "_type_" */
static PyObject *data_key; /* "_data_" */

/* self: a tuple (decoders: dict[str, callable], fallback: callable) */
static PyObject *
object_hook(PyObject *self, PyObject *d)
{
    if (!PyDict_CheckExact(d) || PyDict_GET_SIZE(d) != 2) {
        return Py_NewRef(d);
    }
    PyObject *name = PyDict_GetItemWithError(d, type_key); /* borrowed */
    if (name == NULL) {
        return PyErr_Occurred() ? NULL : Py_NewRef(d);
    }
    PyObject *data = PyDict_GetItemWithError(d, data_key);
    if (data == NULL) {
        return PyErr_Occurred() ? NULL : Py_NewRef(d);
    }
    if (PyUnicode_CheckExact(name)) {
        PyObject *decode = PyDict_GetItemWithError(PyTuple_GET_ITEM(self, 0), name);
        if (decode != NULL) {
            return PyObject_CallOneArg(decode, data);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    return PyObject_CallOneArg(PyTuple_GET_ITEM(self, 1), d);
}

static PyMethodDef hook_def = {"object_hook", object_hook, METH_O,
                               "decode one map as the transcoder's Python hook would"};

static PyObject *
make_object_hook(PyObject *module, PyObject *args)
{
    PyObject *decoders, *fallback;
    if (!PyArg_ParseTuple(args, "O!O:make_object_hook", &PyDict_Type, &decoders, &fallback)) {
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return NULL;
    }
    PyObject *state = PyTuple_Pack(2, decoders, fallback);
    if (state == NULL) {
        return NULL;
    }
    PyObject *hook = PyCFunction_NewEx(&hook_def, state, module);
    Py_DECREF(state);
    return hook;
}

static PyMethodDef module_methods[] = {
    {"make_object_hook", make_object_hook, METH_VARARGS,
     "make_object_hook(decoders, fallback): msgpack's object_hook for the transcoder; "
     "decoders maps a transcoding's name to its decode, and is read at every call"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_fasthook", "The transcoder's msgpack object hook, in C.", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__fasthook(void)
{
    type_key = PyUnicode_InternFromString("_type_");
    data_key = PyUnicode_InternFromString("_data_");
    if (type_key == NULL || data_key == NULL) {
        return NULL;
    }
    return PyModule_Create(&module_def);
}
