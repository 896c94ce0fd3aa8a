"""0.3.2's ``opendelta.utils``: its module paths, as thin aliases over the modules of core that do the work.

Each submodule is imported on its own (``from opendelta.utils.inspect import inspect_module_statistics``); this
package imports none of them, so ``import opendelta`` stays as fast as it was.
"""
