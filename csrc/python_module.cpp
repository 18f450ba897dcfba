// `import kdfast._C` loads this shared object, whose static initialisers register the ops with the
// dispatcher. The module itself is empty (no pybind11), so it is safe under the limited API.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "kdfast compiled ops (registered with torch.ops.kdfast)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
