"Everything public in fastsprkd, in the style of `from fastai.vision.all import *`."
from .data import *
from .models import *
from .core import *
from .eigen import *
from .saddle import *
from .estimators import *
from .analysis import *
from .callback.sprkd import *
from .callback.observe import *
