import sys

from spotd.tools.install import _standalone

sys.exit(_standalone())
