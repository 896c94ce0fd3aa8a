"""0.3.2's ``opendelta.utils.visualization``: bigmodelvis's ``Visualization``, the tree ``DeltaModel.log()`` draws.

0.3.2 moved the class to the ``bigmodelvis`` distribution and kept this path; so do we (``opendelta.Visualization``
is the same class).
"""

from bigmodelvis import Visualization

__all__ = ["Visualization"]
